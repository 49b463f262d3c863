"""Synthetic ExLLSM-like volumes: dark background, bright neurite-like tubes, equally bright puncta.

Used by the tests, the benchmark and the pipeline's ``test`` profile.  Puncta are as bright as
the tubes, so only shape tells them apart; the label marks tubes only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import XYZ


@dataclass(frozen=True)
class SyntheticSpec:
    shape: XYZ = (128, 128, 128)
    n_tubes: int = 6
    n_puncta: int = 30
    tube_radius: tuple[float, float] = (1.5, 3.0)
    punctum_radius: tuple[float, float] = (1.5, 3.0)
    background: float = 30.0
    background_noise: float = 8.0
    brightness: tuple[float, float] = (1000.0, 2000.0)
    seed: int = 0


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def _paint(image: np.ndarray, label: np.ndarray | None, lo: np.ndarray, hi: np.ndarray, dist_fn, radius, value):
    lo = np.maximum(np.floor(lo).astype(int), 0)
    hi = np.minimum(np.ceil(hi).astype(int) + 1, image.shape)
    if np.any(hi <= lo):
        return
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), -1).reshape(-1, 3)
    d = dist_fn(grid.astype(np.float64)).reshape(tuple(hi - lo))
    profile = value * np.exp(-0.5 * (d / max(radius * 0.6, 1e-3)) ** 2)
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    np.maximum(image[region], profile, out=image[region])
    if label is not None:
        label[region] |= d <= radius


def synthetic_volume(spec: SyntheticSpec = SyntheticSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image uint16, neuron label uint8)`` in x,y,z order."""
    rng = np.random.default_rng(spec.seed)
    shape = np.array(spec.shape)
    signal = np.zeros(spec.shape, dtype=np.float32)
    label = np.zeros(spec.shape, dtype=bool)
    for _ in range(spec.n_tubes):
        # a polyline of 3 segments wandering through the volume
        points = [rng.uniform(0, shape)]
        for _ in range(3):
            step = rng.normal(size=3)
            step *= rng.uniform(0.3, 0.6) * shape.min() / np.linalg.norm(step)
            points.append(np.clip(points[-1] + step, 0, shape - 1))
        radius = rng.uniform(*spec.tube_radius)
        value = rng.uniform(*spec.brightness)
        for a, b in zip(points[:-1], points[1:]):
            pad = 3 * radius
            _paint(
                signal,
                label,
                np.minimum(a, b) - pad,
                np.maximum(a, b) + pad,
                lambda p, a=a, b=b: _segment_distance(p, a, b),
                radius,
                value,
            )
    for _ in range(spec.n_puncta):
        c = rng.uniform(0, shape)
        radius = rng.uniform(*spec.punctum_radius)
        value = rng.uniform(*spec.brightness)
        pad = 3 * radius
        _paint(signal, None, c - pad, c + pad, lambda p, c=c: np.linalg.norm(p - c, axis=1), radius, value)
    noise = rng.normal(spec.background, spec.background_noise, size=spec.shape).astype(np.float32)
    image = np.clip(signal + np.abs(noise), 0, 65535).astype(np.uint16)
    return image, label.astype(np.uint8)


def write_synthetic_n5(
    container: str,
    dataset: str = "c1/s0",
    spec: SyntheticSpec = SyntheticSpec(),
    chunks: XYZ = (64, 64, 64),
    label_dataset: str | None = None,
) -> np.ndarray:
    """Write a synthetic image (and optionally its label) to an N5 container; return the image."""
    from .geometry import Box
    from .volume import create_volume

    image, label = synthetic_volume(spec)
    attrs = {"pixelResolution": {"dimensions": [0.104, 0.104, 0.18], "unit": "um"}}
    vol = create_volume(container, dataset, spec.shape, chunks, "uint16", attributes=attrs, overwrite=True)
    vol.write_chunked_zyx(Box((0, 0, 0), spec.shape), image.transpose(2, 1, 0))
    if label_dataset:
        lab = create_volume(container, label_dataset, spec.shape, chunks, "uint8", overwrite=True)
        lab.write_chunked_zyx(Box((0, 0, 0), spec.shape), label.transpose(2, 1, 0))
    return image
