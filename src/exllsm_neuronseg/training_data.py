"""Training data: annotated regions in, an HDF5 library of training examples out (spec section 1).

A **region** is an HDF5 file holding a raw image and its ground truth as two datasets of the
same shape (by default ``t0/channel0`` and ``t0/channel2``, the Fiji-export layout the original
hard-codes).  Arrays are used in their stored axis order; the network does not care, and the
training rotations are uniform in 3D.

Each region is processed on its own, as in the original ``datasetPreparation_cmd.py``:

1. histogram statistics and plots;
2. one intensity scaling factor for the region (:func:`exllsm_neuronseg.scaling.scaling_factor`);
3. the mask: integer labels > 0 are neuron (the original's clip to 0/1); labels that are not
   whole numbers need an explicit threshold (:func:`label_mask`);
4. tiling with ``UnetTiler3D.forEntireCongruentData`` semantics: output tiles at multiples of
   the output edge cover the region, each input tile is its output tile grown by the model
   margin, and whatever falls outside the region is padded with numpy ``reflect``;
5. ``candidates`` distinct tiles drawn uniformly, their foreground fraction measured on the
   output box, and ``samples_per_region`` of them drawn with the original's
   threshold / above-threshold-ratio weights (fixed: no division by zero, small regions work);
6. the chosen tiles written as groups ``<region><tileIndex>`` with ``image`` (float32) and
   ``mask`` (int32), both at the **input** size so that augmentation has context.

Steps 1-5 run for every region (:func:`plan_region`) before step 6 writes anything, into a
temporary copy of the dataset that replaces it at the end (:func:`prepare_dataset`).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import secrets
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from . import testhook
from .errors import DatasetError, OutputError, ParameterError
from .geometry import XYZ, Box, format_xyz

if TYPE_CHECKING:
    from .scaling import ScalingFit

log = logging.getLogger(__name__)

DEFAULT_REGION_NAMES = ("A1", "A2", "B1")
RAW_DATASET = "t0/channel0"
LABEL_DATASET = "t0/channel2"
FOREGROUND_THRESHOLD = 0.001
N_CANDIDATES = 200
DATASET_FILE_NAME = "training-dataset.h5"  # inside a --dataset-dir given as a folder


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
    """Write a region file (replaces ``path``; written under a temporary name, then renamed)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset(raw_dataset, data=image)
            h5.create_dataset(label_dataset, data=label)
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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

    bad = [n for n in names if not n or n != n.strip() or "/" in n or n in (".", "..")]
    if not names or bad:
        raise DatasetError(f"region names must be non-empty file names without '/', got {list(names)}")
    if len(set(names)) != len(names):
        raise DatasetError(f"region names must be unique, got {list(names)}")
    if any(s < 1 for s in shape) or len(shape) != 3:
        raise ParameterError(f"region shape {format_xyz(shape)} must be 3 sizes >= 1")
    if min(n_tubes, n_puncta, seed) < 0:
        raise ParameterError(f"tubes ({n_tubes}), puncta ({n_puncta}) and seed ({seed}) must be >= 0")
    check_output_dir(region_dir, "the regions")
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
# Output paths: checked before any work, nothing created
# --------------------------------------------------------------------------------------------


def _unwritable(what: str, at: Path) -> str:
    """One line for a folder this user cannot write into: where, why and what to do."""
    try:
        read_only = bool(os.statvfs(at).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"cannot write {what}: {at} is on a read-only file system; write it somewhere writable"
    uid = os.geteuid()
    try:
        st = at.stat()
    except OSError:
        return f"cannot write {what}: {at} is not writable by this user (uid {uid})"
    mode = oct(st.st_mode & 0o777)
    if st.st_uid != uid:
        return (
            f"cannot write {what}: {at} is not writable by this user (uid {uid}); it belongs to uid {st.st_uid} "
            f'(mode {mode}); run containers with -u "$(id -u):$(id -g)", or chown it'
        )
    return f"cannot write {what}: {at} is not writable by this user (uid {uid}, mode {mode}); chmod u+w {at}"


def check_output_dir(path: str | Path, what: str, target: str | Path | None = None) -> Path:
    """A folder that exists or can be created, and that this user can write into.

    Nothing is created.  Raises :class:`OutputError` for an empty path, a plain file at or above
    ``path``, or a folder (the nearest existing one) that cannot be written.  ``target`` is the
    path named in the message (default ``path``).
    """
    target = target if target is not None else path
    if not str(path).strip():
        raise OutputError(f"cannot write {what}: the path is empty")
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "is a file" if p == Path(target) else f"lies under the file {p}"
                raise OutputError(f"cannot write {what} to {target}: it {where}, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise OutputError(_unwritable(what, p))
            break
    return path


def check_output_file(path: str | Path, what: str) -> Path:
    """A file path whose folder exists or can be created and is writable; the path is not a folder.

    The file itself is written under a temporary name and renamed, so only its folder matters.
    """
    if not str(path).strip():
        raise OutputError(f"cannot write {what}: the path is empty")
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {what} to {path}: it is a folder, not a file")
    check_output_dir(path.parent, what, target=path)
    return path


def resolve_dataset_path(path: str | Path) -> Path:
    """The dataset file for ``path``: ``path`` itself, or ``<path>/training-dataset.h5`` when it is a
    folder (an existing one, or any path written with a trailing ``/``, as the original README's
    ``--dataset-dir /DATASET-DIR/``)."""
    text = os.fspath(path)
    folder = Path(text)
    if folder.is_dir() or text.endswith(("/", os.sep)):
        return folder / DATASET_FILE_NAME
    return folder


def _replace(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``path`` (one step: the old file or the new one)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_figure(fig, path: Path, dpi: int = 80) -> None:
    """``fig`` as PNG at ``path``, written under a temporary name first (never a half plot)."""
    tmp = path.with_name(path.name + ".partial")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def write_histogram(counts: np.ndarray, bins: np.ndarray, name: str, diagnostics_dir: Path) -> None:
    """``region_<R>_histogramm_counts`` / ``_bins`` (one value a line) and ``region_<R>_hist.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for suffix, values, fmt in (("counts", counts, "%d"), ("bins", bins, "%.18e")):
        path = diagnostics_dir / f"region_{name}_histogramm_{suffix}"
        tmp = path.with_name(path.name + ".partial")
        np.savetxt(tmp, values, fmt=fmt)
        os.replace(tmp, path)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(bins[:-1], counts, width=np.diff(bins), align="edge", log=True)
    ax.set_xlabel("intensity")
    ax.set_ylabel("count")
    ax.set_title(f"region {name}")
    fig.tight_layout()
    try:
        save_figure(fig, diagnostics_dir / f"region_{name}_hist.png")
    finally:
        plt.close(fig)


def tile_examples(
    image: np.ndarray, mask: np.ndarray, tiling: RegionTiling, indices: Sequence[int]
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(tile_index, image tile, mask tile)`` at the input size, reflect-padded."""
    for i in indices:
        box = tiling.input_box(int(i))
        yield int(i), crop_and_pad(image, box), crop_and_pad(mask, box)


def label_mask(truth: np.ndarray, region: Region, label_threshold: float | None = None) -> np.ndarray:
    """The ground truth as an int32 0/1 mask.

    Integer (and boolean) labels: values > 0 are neuron, as the original's clip to [0, 1].  Float
    labels must hold whole numbers (a Fiji export of an integer label): any other value (0.7, a
    probability) is an error unless ``label_threshold`` is given, in which case values above it
    are neuron.  NaN or infinite labels are always an error.
    """
    what = f"region {region.name}: ground truth {region.label_dataset} ({truth.dtype})"
    kind = truth.dtype.kind
    if kind not in "biuf":
        raise DatasetError(f"{what} is not numeric; labels must be integers (> 0 = neuron)")
    if kind == "f":
        bad = ~np.isfinite(truth)
        if bad.any():
            raise DatasetError(f"{what} holds {int(bad.sum())} NaN or infinite values; labels must be finite")
    if label_threshold is not None:
        return (truth > label_threshold).astype(np.int32)
    if kind == "f":
        fractional = truth != np.floor(truth)
        n = int(np.count_nonzero(fractional))
        if n:
            example = float(truth[fractional].flat[0])
            raise DatasetError(
                f"{what} holds {n} non-integer values (e.g. {example:g}): labels must be integers (> 0 = neuron), "
                "and rounding them would silently drop foreground; give a label threshold (values above it are "
                "neuron) to use them"
            )
    return (truth > 0).astype(np.int32)


@dataclass
class RegionPlan:
    """What preparation will write for one region, decided before anything is written."""

    region: Region
    shape: XYZ
    label_threshold: float | None
    fit: ScalingFit
    histogram: tuple[np.ndarray, np.ndarray]
    tiling: RegionTiling
    fractions: dict[int, float]
    summary: RegionSummary

    @property
    def keys(self) -> list[str]:
        return [f"{self.region.name}{i}" for i in self.summary.chosen]


def _mirrored_share(shape: Sequence[int], tile: Sequence[int]) -> float:
    """The least share of a tile of shape ``tile`` that lies outside a region of ``shape``."""
    return 1.0 - math.prod(min(s, t) / t for s, t in zip(shape, tile))


def check_region_size(name: str, shape: XYZ, input_shape: XYZ, output_shape: XYZ) -> None:
    """A region smaller than a tile gives examples that are partly mirrored copies of itself.

    Smaller than the tile's *output* box so that less than half of each example's labelled
    voxels are real: refused (:class:`DatasetError`).  Smaller than the tile's *input* (but
    holding half its output): a warning naming the axes and the mirrored share.
    """
    mirrored_out = _mirrored_share(shape, output_shape)
    if mirrored_out > 0.5:
        raise DatasetError(
            f"region {name} is {format_xyz(shape)}, smaller than the tile output {format_xyz(output_shape)}: "
            f"{100 * mirrored_out:.0f}% of every example's labelled voxels would be mirrored copies of the region; "
            "use regions at least as large as the tile output (or smaller tiles)"
        )
    axes = [a for a, s, i in zip("xyz", shape, input_shape) if s < i]
    if axes:
        labelled = f", {100 * mirrored_out:.0f}% of its labelled output" if mirrored_out > 0 else ""
        log.warning(
            "warning: region %s is %s, smaller than the tile input %s along %s: at least %.0f%% of each of its "
            "examples%s is mirrored copies of the region",
            name, format_xyz(shape), format_xyz(input_shape), ",".join(axes),
            100 * _mirrored_share(shape, input_shape), labelled,
        )


def plan_region(
    region: Region,
    input_shape: XYZ = (220, 220, 220),
    output_shape: XYZ = (132, 132, 132),
    above_threshold_ratio: float = 0.9,
    samples_per_region: int = 50,
    n_candidates: int = N_CANDIDATES,
    threshold: float = FOREGROUND_THRESHOLD,
    rng: np.random.Generator | None = None,
    label_threshold: float | None = None,
) -> RegionPlan:
    """Read and check one region and decide its examples (see the module docstring); writes nothing.

    Raises :class:`DatasetError` for a region that cannot be used: unreadable, missing datasets,
    shapes, non-integer or non-finite labels, non-finite raw values, smaller than half a tile
    output, no usable scaling factor.  Labels without foreground are a warning.
    """
    from .scaling import intensity_histogram, scaling_factor_from_histogram

    rng = rng or np.random.default_rng()
    raw, truth = read_region(region)
    shape: XYZ = tuple(raw.shape)  # type: ignore[assignment]
    check_region_size(region.name, shape, input_shape, output_shape)
    mask = label_mask(truth, region, label_threshold)
    del truth
    if raw.dtype.kind not in "biuf":
        raise DatasetError(f"region {region.name}: raw {region.raw_dataset} ({raw.dtype}) is not a numeric image")
    if raw.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(raw)))
        if bad:
            raise DatasetError(f"region {region.name}: raw {region.raw_dataset} holds {bad} NaN or infinite values")
    n_foreground = int(np.count_nonzero(mask))
    if n_foreground == 0:
        log.warning(
            "warning: region %s: its ground truth %s has no neuron voxels (no label above %s): all its examples "
            "teach background only", region.name, region.label_dataset, label_threshold if label_threshold is not None else 0,
        )
    mean, std = float(raw.mean()), float(raw.std())
    log.info("region %s: shape %s, mean: %s std: %s", region.name, raw.shape, mean, std)
    histogram = np.histogram(raw, bins=100, range=[0, 2000])
    fit = scaling_factor_from_histogram(intensity_histogram(raw))
    del raw
    if not fit.valid:
        raise DatasetError(
            f"region {region.name}: no usable scaling factor ({fit.factor}); its intensity histogram over "
            "[0, 4000] has no exponential decay (too few filled bins or not raw 16-bit data)"
        )

    tiling = RegionTiling(shape, tuple(input_shape), tuple(output_shape))  # type: ignore[arg-type]
    n_tiles = len(tiling)
    n_cand = min(n_candidates, n_tiles)
    if n_cand < n_candidates:
        log.info("region %s: %d tiles, fewer than %d candidates: all tiles are candidates", region.name, n_tiles, n_candidates)
    candidates = rng.choice(n_tiles, n_cand, replace=False)
    proportions = foreground_fractions(tiling, mask, candidates)
    del mask
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
        shape=shape,
        mean=mean,
        std=std,
        scaling_factor=float(fit.factor),
        n_tiles=n_tiles,
        n_candidates=n_cand,
        n_high_candidates=int((proportions > threshold).sum()),
        chosen=sorted(int(i) for i in chosen),
        n_high_chosen=int(sum(high_of[int(i)] for i in chosen)),
    )
    log.info(
        "region %s: factor %.6g, %d tiles, %d candidates (%d above %g), chose %d (%d above)",
        region.name, fit.factor, n_tiles, n_cand, summary.n_high_candidates, threshold,
        len(summary.chosen), summary.n_high_chosen,
    )
    return RegionPlan(
        region, shape, label_threshold, fit, histogram, tiling, dict(zip(candidates.tolist(), proportions.tolist())), summary
    )


def write_region_examples(plan: RegionPlan, h5, diagnostics_dir: Path | None = None) -> RegionSummary:
    """Write a planned region's examples into the open dataset file ``h5`` (and its diagnostics)."""
    from .scaling import plot_fit

    region, summary = plan.region, plan.summary
    raw, truth = read_region(region)
    if tuple(raw.shape) != plan.shape:
        raise DatasetError(f"region {region.name}: {region.path} changed while it was prepared (shape {raw.shape})")
    factor = summary.scaling_factor
    image = raw.astype(np.float32) * np.float32(factor)
    del raw
    mask = label_mask(truth, region, plan.label_threshold)
    del truth
    for index, image_tile, mask_tile in tile_examples(image, mask, plan.tiling, summary.chosen):
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
        group.attrs["foreground_fraction"] = float(plan.fractions[index])
        summary.keys.append(key)
    if diagnostics_dir is not None:
        write_histogram(*plan.histogram, region.name, diagnostics_dir)
        plot_fit(plan.fit, diagnostics_dir / f"region_{region.name}_expFit.png")
    return summary


def existing_examples(path: Path) -> tuple[set[str], set[tuple[int, ...]]]:
    """Keys and example shapes of an existing dataset file (empty sets when there is none)."""
    import h5py

    if not path.exists():
        return set(), set()
    try:
        with h5py.File(path, "r") as h5:
            keys = {k for k in h5.keys() if isinstance(h5[k], h5py.Group) and "image" in h5[k] and "mask" in h5[k]}
            shapes = {tuple(h5[k]["image"].shape) for k in keys} | {tuple(h5[k]["mask"].shape) for k in keys}
    except OSError as exc:
        raise DatasetError(
            f"{path} exists and is not a readable HDF5 dataset ({exc}); it is not replaced: choose another file"
        ) from exc
    return keys, shapes


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
    label_threshold: float | None = None,
) -> DatasetSummary:
    """Tile and sample every region into the dataset file (appended to, created if missing).

    **Every region is read and checked before anything is written** (see :func:`plan_region`),
    and the dataset is written to a temporary file beside it that replaces it at the end: a bad
    region, a failure or a kill leaves the previous dataset as it was and no diagnostics.

    Args:
        regions: the annotated regions.
        dataset_path: output HDF5 file (a folder: ``<folder>/training-dataset.h5``); existing
            examples of other keys are kept, and must have the tile input shape.
        diagnostics_dir: where histograms and scaling-fit plots go (created); None for none.
        input_shape, output_shape: tile shapes (x,y,z); examples are stored at ``input_shape``.
        above_threshold_ratio: target share of tiles with foreground fraction > ``threshold``.
        samples_per_region: examples per region (capped at the number of candidates).
        n_candidates: tiles drawn uniformly per region before the weighted draw.
        seed: makes the draw reproducible; a random one is chosen (and reported) when None.
        label_threshold: labels above it are neuron; needed for labels that are not whole numbers.

    Returns:
        A :class:`DatasetSummary` (``summary()`` is a one-line report).
    """
    import h5py

    if not regions:
        raise DatasetError("no regions given")
    for what, value in (("samples per region", samples_per_region), ("candidates", n_candidates)):
        if value < 1:
            raise ParameterError(f"{what} {value} must be >= 1")
    if not 0.0 <= above_threshold_ratio <= 1.0:
        raise ParameterError(f"above-threshold ratio {above_threshold_ratio} must be in [0, 1]")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ParameterError(f"foreground threshold {threshold} must be a finite number >= 0")
    if label_threshold is not None and not math.isfinite(label_threshold):
        raise ParameterError(f"label threshold {label_threshold} must be a finite number")
    names = [r.name for r in regions]
    if len(set(names)) != len(names):
        raise DatasetError(f"region names must be unique (they prefix the example keys), got {names}")
    t0 = time.perf_counter()
    seed = int(seed) if seed is not None else secrets.randbits(31)
    input_shape, output_shape = tuple(input_shape), tuple(output_shape)  # type: ignore[assignment]
    RegionTiling(output_shape, input_shape, output_shape)  # the tile shapes themselves
    dataset_path = check_output_file(resolve_dataset_path(dataset_path), "the training dataset")
    diag = check_output_dir(diagnostics_dir, "the diagnostics") if diagnostics_dir is not None else None
    _, old_shapes = existing_examples(dataset_path)
    if old_shapes and old_shapes != {input_shape}:
        raise DatasetError(
            f"{dataset_path} holds examples of {' and '.join(sorted(format_xyz(s) for s in old_shapes))}, these "
            f"would be {format_xyz(input_shape)} (the tile input shape): training needs one example shape, so "
            "write them to another dataset file (or use the dataset's tile shapes)"
        )

    plans, errors = [], []
    for region in regions:
        try:
            plans.append(
                plan_region(
                    region, input_shape, output_shape, above_threshold_ratio, samples_per_region, n_candidates,
                    threshold, _region_rng(seed, region.name), label_threshold,
                )
            )
        except DatasetError as exc:
            errors.append(str(exc))
    if errors:
        raise DatasetError(
            errors[0] if len(errors) == 1 else f"{len(errors)} of {len(regions)} regions cannot be used: " + "; ".join(errors)
        )
    owner: dict[str, str] = {}
    for plan in plans:
        for key in plan.keys:
            if key in owner:
                raise DatasetError(
                    f"regions {owner[key]} and {plan.region.name} would both write example {key} (a region name "
                    "followed by a tile index): rename one of them"
                )
            owner[key] = plan.region.name

    dataset_path.parent.mkdir(parents=True, exist_ok=True)
    if diag is not None:
        diag.mkdir(parents=True, exist_ok=True)
    for stale in dataset_path.parent.glob(f"{glob.escape(dataset_path.name)}.*.partial"):
        stale.unlink(missing_ok=True)  # left by a killed run
    tmp = dataset_path.with_name(f"{dataset_path.name}.{secrets.token_hex(4)}.partial")
    summaries = []
    try:
        if dataset_path.exists():
            shutil.copyfile(dataset_path, tmp)
        with h5py.File(tmp, "a") as h5:
            for plan in plans:
                summaries.append(write_region_examples(plan, h5, diag))
                testhook.checkpoint("prepare:region-written")
            n_examples = sum(1 for k in h5.keys() if isinstance(h5[k], h5py.Group))
        _replace(tmp, dataset_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if on_region:
        for s in summaries:
            on_region(s)
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
