"""Training data: annotated regions in, an HDF5 library of training examples out (spec section 1).

A **region** is an HDF5 file holding a raw image and its ground truth as two datasets of the
same shape (by default ``t0/channel0`` and ``t0/channel2``, the Fiji-export layout the original
hard-codes).  Arrays are used in their stored axis order; the network does not care, and the
training rotations are uniform in 3D.

Each region is processed on its own, as in the original ``datasetPreparation_cmd.py``:

1. histogram statistics and plots;
2. one intensity scaling factor for the region (:func:`exllsm_neuronseg.scaling.scaling_factor`);
3. the mask clipped to 0/1;
4. tiling with ``UnetTiler3D.forEntireCongruentData`` semantics: output tiles at multiples of
   the output edge cover the region, each input tile is its output tile grown by the model
   margin, and whatever falls outside the region is padded with numpy ``reflect``;
5. ``candidates`` distinct tiles drawn uniformly, their foreground fraction measured on the
   output box, and ``samples_per_region`` of them drawn with the original's
   threshold / above-threshold-ratio weights (fixed: no division by zero, small regions work);
6. the chosen tiles written as groups ``<region><tileIndex>`` with ``image`` (float32) and
   ``mask`` (int32), both at the **input** size so that augmentation has context.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import DatasetError
from .geometry import XYZ, Box, format_xyz

log = logging.getLogger(__name__)

DEFAULT_REGION_NAMES = ("A1", "A2", "B1")
RAW_DATASET = "t0/channel0"
LABEL_DATASET = "t0/channel2"
FOREGROUND_THRESHOLD = 0.001
N_CANDIDATES = 200


# --------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """One annotated region: an HDF5 file with a raw and a ground-truth dataset."""

    name: str
    path: Path
    raw_dataset: str = RAW_DATASET
    label_dataset: str = LABEL_DATASET


def find_regions(
    region_dir: str | Path,
    names: Sequence[str] = DEFAULT_REGION_NAMES,
    raw_dataset: str = RAW_DATASET,
    label_dataset: str = LABEL_DATASET,
) -> list[Region]:
    """Regions ``<region_dir>/<name>/<name>.h5`` (the original layout) or ``<region_dir>/<name>.h5``."""
    region_dir = Path(region_dir)
    regions, missing = [], []
    for name in names:
        candidates = [region_dir / name / f"{name}.h5", region_dir / f"{name}.h5"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(f"{name} (looked for {candidates[0]} and {candidates[1]})")
        else:
            regions.append(Region(name, path, raw_dataset, label_dataset))
    if missing:
        found = sorted(p.name for p in region_dir.iterdir()) if region_dir.is_dir() else []
        raise DatasetError(
            f"region file(s) not found: {'; '.join(missing)}; {region_dir} holds "
            f"{', '.join(found[:10]) or 'nothing'} (choose regions with --regions or --region-file)"
        )
    return regions


def _dataset_names(h5) -> list[str]:
    import h5py

    names: list[str] = []
    h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def read_region(region: Region) -> tuple[np.ndarray, np.ndarray]:
    """Load a region's raw image and ground truth (read-only), checking both exist and agree."""
    import h5py

    try:
        h5 = h5py.File(region.path, "r")
    except OSError as exc:
        raise DatasetError(f"region {region.name}: {region.path} is not a readable HDF5 file ({exc})") from exc
    with h5:
        arrays = []
        for what, ds in (("raw", region.raw_dataset), ("ground-truth", region.label_dataset)):
            if ds not in h5 or not hasattr(h5[ds], "shape"):
                raise DatasetError(
                    f"region {region.name}: {region.path} has no {what} dataset {ds!r}; it holds "
                    f"{', '.join(_dataset_names(h5)[:10]) or 'no datasets'}"
                )
            arrays.append(h5[ds][...])
    image, mask = arrays
    if image.ndim != 3 or mask.shape != image.shape:
        raise DatasetError(
            f"region {region.name}: raw {region.raw_dataset} has shape {image.shape} and ground truth "
            f"{region.label_dataset} has shape {mask.shape}; both must be the same 3D shape"
        )
    return image, mask


def write_region(
    path: str | Path,
    image: np.ndarray,
    label: np.ndarray,
    raw_dataset: str = RAW_DATASET,
    label_dataset: str = LABEL_DATASET,
) -> Path:
    """Write a region file (overwrites ``path``)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.create_dataset(raw_dataset, data=image)
        h5.create_dataset(label_dataset, data=label)
    return path


def write_synthetic_regions(
    region_dir: str | Path,
    names: Sequence[str] = DEFAULT_REGION_NAMES,
    shape: XYZ = (256, 256, 256),
    n_tubes: int = 12,
    n_puncta: int = 300,
    seed: int = 0,
    raw_dataset: str = RAW_DATASET,
    label_dataset: str = LABEL_DATASET,
) -> list[Region]:
    """Write synthetic ground-truth regions ``<region_dir>/<name>/<name>.h5``.

    Tubes (neurites) are labelled; puncta, as bright as the tubes, are not; the background is
    dark noise.  Region ``i`` uses seed ``seed + i``.
    """
    from .synthetic import SyntheticSpec, synthetic_volume

    regions = []
    for i, name in enumerate(names):
        spec = SyntheticSpec(shape=tuple(shape), n_tubes=n_tubes, n_puncta=n_puncta, seed=seed + i)
        image, label = synthetic_volume(spec)
        path = write_region(Path(region_dir) / name / f"{name}.h5", image, label, raw_dataset, label_dataset)
        regions.append(Region(name, path, raw_dataset, label_dataset))
    return regions


# --------------------------------------------------------------------------------------------
# Tiling (UnetTiler3D.forEntireCongruentData)
# --------------------------------------------------------------------------------------------


def crop_and_pad(array: np.ndarray, box: Box) -> np.ndarray:
    """``array[box]`` with the part outside the array padded by numpy ``reflect``.

    Like the original ``AbsoluteCanvas.cropAndPadAABB``: the *intersection* is reflected (the
    edge voxel is not repeated; pads longer than the intersection reflect again).
    """
    inside = box.intersect(Box((0, 0, 0), array.shape))  # type: ignore[arg-type]
    if inside.empty:
        raise DatasetError(f"tile {box} does not overlap the region of shape {array.shape}")
    data = array[inside.slices()]
    pads = [(i0 - b0, b1 - i1) for b0, b1, i0, i1 in zip(box.start, box.end, inside.start, inside.end)]
    if any(p for pair in pads for p in pair):
        mode = "reflect" if min(data.shape) > 1 else "edge"
        data = np.pad(data, pads, mode=mode)
    return data


@dataclass(frozen=True)
class RegionTiling:
    """Output tiles at ``k * output_shape`` covering the region; inputs grown by the margin.

    Tile ``i`` has grid coordinates ``(i // (ny*nz), (i % (ny*nz)) // nz, i % nz)`` (z fastest).
    """

    region_shape: XYZ
    input_shape: XYZ
    output_shape: XYZ

    def __post_init__(self) -> None:
        for i, o in zip(self.input_shape, self.output_shape):
            if o < 1 or i < o or (i - o) % 2:
                raise DatasetError(
                    f"tile input {format_xyz(self.input_shape)} and output {format_xyz(self.output_shape)} "
                    "must satisfy input >= output >= 1 with an even difference"
                )

    @property
    def grid(self) -> XYZ:
        return tuple(math.ceil(s / o) for s, o in zip(self.region_shape, self.output_shape))  # type: ignore

    @property
    def margin(self) -> XYZ:
        return tuple((i - o) // 2 for i, o in zip(self.input_shape, self.output_shape))  # type: ignore

    def __len__(self) -> int:
        return math.prod(self.grid)

    def grid_index(self, i: int) -> XYZ:
        _, ny, nz = self.grid
        return (i // (ny * nz), (i % (ny * nz)) // nz, i % nz)

    def output_box(self, i: int) -> Box:
        start = tuple(k * o for k, o in zip(self.grid_index(i), self.output_shape))
        return Box(start, tuple(s + o for s, o in zip(start, self.output_shape)))  # type: ignore[arg-type]

    def input_box(self, i: int) -> Box:
        return self.output_box(i).grow(self.margin)


def foreground_fractions(tiling: RegionTiling, mask: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """Fraction of non-zero mask voxels in each tile's output box (reflected voxels included)."""
    size = math.prod(tiling.output_shape)
    return np.array(
        [np.count_nonzero(crop_and_pad(mask, tiling.output_box(int(i)))) / size for i in indices], dtype=np.float64
    )


def thresholded_sampling(
    indices: Sequence[int],
    proportions: Sequence[float],
    threshold: float = FOREGROUND_THRESHOLD,
    above_threshold_ratio: float = 0.9,
    n_samples: int = 50,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Draw ``n_samples`` distinct indices, favouring tiles whose proportion exceeds ``threshold``.

    The original's weights (``Dataset3D.thresholdedSampling``): each of the ``N_hi`` tiles above
    the threshold gets ``r / N_hi`` and each of the ``N_lo`` others ``(1 - r) / N_lo``, with
    ``r`` clipped to [1e-4, 1 - 1e-4]; then weighted sampling without replacement, so the share
    of high tiles is only approximately ``r``.  Fixed here: an empty group gets no weight
    instead of a division by zero, and ``n_samples`` is capped at the number of indices.
    """
    rng = rng or np.random.default_rng()
    indices = np.asarray(indices)
    proportions = np.asarray(proportions, dtype=np.float64)
    if indices.shape != proportions.shape:
        raise DatasetError(f"{len(indices)} indices but {len(proportions)} proportions")
    n_samples = min(int(n_samples), len(indices))
    if n_samples <= 0:
        return indices[:0]
    r = float(np.clip(above_threshold_ratio, 1e-4, 1 - 1e-4))
    high = proportions > threshold
    n_hi, n_lo = int(high.sum()), int((~high).sum())
    p = np.zeros(len(indices), dtype=np.float64)
    if n_hi:
        p[high] = r / n_hi
    if n_lo:
        p[~high] = (1 - r) / n_lo
    p /= p.sum()
    return rng.choice(indices, n_samples, replace=False, p=p)


# --------------------------------------------------------------------------------------------
# Dataset preparation
# --------------------------------------------------------------------------------------------


@dataclass
class RegionSummary:
    name: str
    shape: tuple[int, ...]
    mean: float
    std: float
    scaling_factor: float
    n_tiles: int
    n_candidates: int
    n_high_candidates: int
    chosen: list[int]
    n_high_chosen: int
    keys: list[str] = field(default_factory=list)


@dataclass
class DatasetSummary:
    path: Path
    regions: list[RegionSummary]
    n_examples: int
    seed: int
    seconds: float = 0.0

    def summary(self) -> str:
        chosen = sum(len(r.chosen) for r in self.regions)
        high = sum(r.n_high_chosen for r in self.regions)
        names = ",".join(r.name for r in self.regions)
        return (
            f"dataset {self.path}: wrote {chosen} examples from {len(self.regions)} region(s) [{names}] "
            f"({high} above the foreground threshold), now {self.n_examples} examples; seed {self.seed}; "
            f"{self.seconds:.1f} s"
        )


def _region_rng(seed: int, name: str) -> np.random.Generator:
    # keyed by name, so a region's sample does not depend on which other regions are prepared
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf8"))])


def write_histogram(image: np.ndarray, name: str, diagnostics_dir: Path) -> None:
    """``region_<R>_histogramm_counts`` / ``_bins`` (one value a line) and ``region_<R>_hist.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts, bins = np.histogram(image, bins=100, range=[0, 2000])
    np.savetxt(diagnostics_dir / f"region_{name}_histogramm_counts", counts, fmt="%d")
    np.savetxt(diagnostics_dir / f"region_{name}_histogramm_bins", bins)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(bins[:-1], counts, width=np.diff(bins), align="edge", log=True)
    ax.set_xlabel("intensity")
    ax.set_ylabel("count")
    ax.set_title(f"region {name}")
    fig.tight_layout()
    fig.savefig(diagnostics_dir / f"region_{name}_hist.png", dpi=80)
    plt.close(fig)


def tile_examples(
    image: np.ndarray, mask: np.ndarray, tiling: RegionTiling, indices: Sequence[int]
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(tile_index, image tile, mask tile)`` at the input size, reflect-padded."""
    for i in indices:
        box = tiling.input_box(int(i))
        yield int(i), crop_and_pad(image, box), crop_and_pad(mask, box)


def prepare_region(
    region: Region,
    h5,
    input_shape: XYZ = (220, 220, 220),
    output_shape: XYZ = (132, 132, 132),
    above_threshold_ratio: float = 0.9,
    samples_per_region: int = 50,
    n_candidates: int = N_CANDIDATES,
    threshold: float = FOREGROUND_THRESHOLD,
    rng: np.random.Generator | None = None,
    diagnostics_dir: Path | None = None,
) -> RegionSummary:
    """Process one region into the open dataset file ``h5`` (see the module docstring)."""
    from .scaling import scaling_factor

    rng = rng or np.random.default_rng()
    raw, truth = read_region(region)
    mean, std = float(raw.mean()), float(raw.std())
    log.info("region %s: shape %s, mean: %s std: %s", region.name, raw.shape, mean, std)
    plot = None
    if diagnostics_dir is not None:
        write_histogram(raw, region.name, diagnostics_dir)
        plot = diagnostics_dir / f"region_{region.name}_expFit.png"
    factor = scaling_factor(raw, plot_file=plot)
    if not math.isfinite(factor) or factor <= 0:
        raise DatasetError(
            f"region {region.name}: no usable scaling factor ({factor}); its intensity histogram over "
            "[0, 4000] has no exponential decay (too few filled bins or not raw 16-bit data)"
        )
    image = raw.astype(np.float32) * np.float32(factor)
    del raw
    mask = np.clip(truth, 0, 1).astype(np.int32)
    del truth

    tiling = RegionTiling(tuple(image.shape), tuple(input_shape), tuple(output_shape))  # type: ignore[arg-type]
    n_tiles = len(tiling)
    n_cand = min(n_candidates, n_tiles)
    if n_cand < n_candidates:
        log.info("region %s: %d tiles, fewer than %d candidates: all tiles are candidates", region.name, n_tiles, n_candidates)
    candidates = rng.choice(n_tiles, n_cand, replace=False)
    proportions = foreground_fractions(tiling, mask, candidates)
    n_samples = min(samples_per_region, n_cand)
    if n_samples < samples_per_region:
        log.info(
            "region %s: reducing samples per region from %d to %d, the number of candidate tiles",
            region.name, samples_per_region, n_samples,
        )
    chosen = thresholded_sampling(candidates, proportions, threshold, above_threshold_ratio, n_samples, rng)
    high_of = dict(zip(candidates.tolist(), (proportions > threshold).tolist()))
    summary = RegionSummary(
        name=region.name,
        shape=tuple(image.shape),
        mean=mean,
        std=std,
        scaling_factor=float(factor),
        n_tiles=n_tiles,
        n_candidates=n_cand,
        n_high_candidates=int((proportions > threshold).sum()),
        chosen=sorted(int(i) for i in chosen),
        n_high_chosen=int(sum(high_of[int(i)] for i in chosen)),
    )
    fraction_of = dict(zip(candidates.tolist(), proportions.tolist()))
    for index, image_tile, mask_tile in tile_examples(image, mask, tiling, summary.chosen):
        key = f"{region.name}{index}"
        if key in h5:
            log.info("Overwriting item %s", key)
            del h5[key]
        group = h5.create_group(key)
        group.create_dataset("image", data=image_tile.astype(np.float32, copy=False))
        group.create_dataset("mask", data=mask_tile.astype(np.int32, copy=False))
        group.attrs["region"] = region.name
        group.attrs["tile_index"] = index
        group.attrs["scaling_factor"] = float(factor)
        group.attrs["foreground_fraction"] = float(fraction_of[index])
        summary.keys.append(key)
    log.info(
        "region %s: factor %.6g, %d tiles, %d candidates (%d above %g), chose %d (%d above)",
        region.name, factor, n_tiles, n_cand, summary.n_high_candidates, threshold,
        len(summary.chosen), summary.n_high_chosen,
    )
    return summary


def prepare_dataset(
    regions: Sequence[Region],
    dataset_path: str | Path,
    diagnostics_dir: str | Path | None = None,
    input_shape: XYZ = (220, 220, 220),
    output_shape: XYZ = (132, 132, 132),
    above_threshold_ratio: float = 0.9,
    samples_per_region: int = 50,
    n_candidates: int = N_CANDIDATES,
    threshold: float = FOREGROUND_THRESHOLD,
    seed: int | None = None,
    on_region: Callable[[RegionSummary], None] | None = None,
) -> DatasetSummary:
    """Tile and sample every region into the dataset file (appended to, created if missing).

    Args:
        regions: the annotated regions.
        dataset_path: output HDF5 file; existing examples of other keys are kept.
        diagnostics_dir: where histograms and scaling-fit plots go (created); None for none.
        input_shape, output_shape: tile shapes (x,y,z); examples are stored at ``input_shape``.
        above_threshold_ratio: target share of tiles with foreground fraction > ``threshold``.
        samples_per_region: examples per region (capped at the number of candidates).
        n_candidates: tiles drawn uniformly per region before the weighted draw.
        seed: makes the draw reproducible; a random one is chosen (and reported) when None.

    Returns:
        A :class:`DatasetSummary` (``summary()`` is a one-line report).
    """
    import h5py

    if not regions:
        raise DatasetError("no regions given")
    if samples_per_region < 1 or n_candidates < 1:
        raise DatasetError(
            f"samples per region ({samples_per_region}) and candidates ({n_candidates}) must be >= 1"
        )
    if not 0.0 <= above_threshold_ratio <= 1.0:
        raise DatasetError(f"above-threshold ratio {above_threshold_ratio} must be in [0, 1]")
    t0 = time.perf_counter()
    seed = int(seed) if seed is not None else secrets.randbits(31)
    dataset_path = Path(dataset_path)
    dataset_path.parent.mkdir(parents=True, exist_ok=True)
    diag = Path(diagnostics_dir) if diagnostics_dir is not None else None
    if diag is not None:
        diag.mkdir(parents=True, exist_ok=True)
    names = [r.name for r in regions]
    if len(set(names)) != len(names):
        raise DatasetError(f"region names must be unique (they prefix the example keys), got {names}")
    summaries = []
    with h5py.File(dataset_path, "a") as h5:
        for region in regions:
            s = prepare_region(
                region,
                h5,
                input_shape,
                output_shape,
                above_threshold_ratio,
                samples_per_region,
                n_candidates,
                threshold,
                _region_rng(seed, region.name),
                diag,
            )
            summaries.append(s)
            if on_region:
                on_region(s)
        n_examples = sum(1 for k in h5.keys() if isinstance(h5[k], h5py.Group))
    return DatasetSummary(dataset_path, summaries, n_examples, seed, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Reading a dataset back
# --------------------------------------------------------------------------------------------


class ExampleLibrary:
    """Read access to a prepared dataset (keys sorted, as the original's ``Dataset``).

    The file is opened lazily and read-only; h5py serialises concurrent reads, so one instance
    can serve a parallel ``tf.data`` map.
    """

    def __init__(self, path: str | Path) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(f"training dataset {self.path} does not exist (make it with prepare_dataset.py)")
        try:
            with h5py.File(self.path, "r") as h5:
                self.keys = sorted(
                    k for k in h5.keys() if isinstance(h5[k], h5py.Group) and "image" in h5[k] and "mask" in h5[k]
                )
                if not self.keys:
                    raise DatasetError(f"training dataset {self.path} holds no examples (groups with image and mask)")
                shapes = {tuple(h5[k]["image"].shape) for k in self.keys} | {tuple(h5[k]["mask"].shape) for k in self.keys}
        except OSError as exc:
            raise DatasetError(f"training dataset {self.path} is not a readable HDF5 file ({exc})") from exc
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise DatasetError(
                f"training dataset {self.path}: examples must all have one 3D shape for image and mask, "
                f"found {sorted(shapes)}"
            )
        self.example_shape: XYZ = next(iter(shapes))  # type: ignore[assignment]
        self._h5 = None

    def __len__(self) -> int:
        return len(self.keys)

    def _file(self):
        import h5py

        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        return self._h5

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """``(image float32, mask int32, attrs)`` of one example."""
        group = self._file()[key]
        return (
            group["image"][...].astype(np.float32, copy=False),
            group["mask"][...].astype(np.int32, copy=False),
            dict(group.attrs),
        )

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
