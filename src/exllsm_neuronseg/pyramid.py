"""Multiscale pyramids of an output dataset, in the N5 conventions BigDataViewer, n5-viewer,
neuroglancer and Paintera read.

Layout.  The full-resolution dataset is ``<group>/s0``; the pyramid adds its siblings ``s1, s2, ...``,
each a dataset of the same dtype, chunk size and compression, with

* ``downsamplingFactors``: x,y,z, absolute (relative to s0, or to what s0's own factors are relative
  to), as n5-spark's pyramids write them;
* ``pixelResolution`` (and ``resolution``, ``units``, ``offset`` when s0 has them) carried from s0
  **unchanged**: every reader of this convention multiplies it by ``downsamplingFactors``
  (n5-viewer's ``N5ViewerMetadataParser`` builds each level's transform as scale(pixelResolution) x
  mipmap(downsamplingFactors); n5-spark's ``N5NonIsotropicScalePyramidSpark`` writes s0's resolution on
  every level). A level's voxel size is ``pixelResolution * downsamplingFactors``; writing it
  pre-multiplied would make viewers scale coarse levels twice.

and the group gets the multiscale attributes n5-viewer's older (``scales``) and newer (per-dataset)
parsers, neuroglancer's N5 source and Paintera read: ``multiScale: true``, ``scales`` (every level's
factors, s0's ``[1,1,1]`` first), ``axes`` ``["x","y","z"]`` and, when the voxel size is known,
``pixelResolution`` ``{"dimensions": [...], "unit": ...}``, ``resolution`` and ``units``.

Factors.  Every level halves the previous one along the finest axes.  With an anisotropic voxel
(the ExLLSM default 0.104 x 0.104 x 0.18 um) a coarse axis is not halved until halving it keeps the
voxel roughly isotropic: level ``k`` has factor ``2**max(0, round(k - log2(r_a / r_min)))`` on an
axis of voxel size ``r_a`` (0.104,0.104,0.18 gives 2,2,1 / 4,4,2 / 8,8,4 ...). These are the
power-of-two factors of the host's pyramid (n5-spark ``N5NonIsotropicScalePyramidSpark -p``); without
``-p`` the host makes factors like 5, 9, 18 along z, which need an intermediate pyramid: powers of two
let each level be computed from the one before it (relative factors 1 or 2). Without a known voxel
size every axis is halved. A level has ``ceil(previous / relative factor)`` voxels per axis (n5-spark
drops the last partial block; here it is kept, so no voxel of s0 is lost at an odd edge, and
``ceil`` chains: level k is exactly ``ceil(s0 / factors)``). Levels are made until one fits in a
single chunk (that one is the last) or the given number of levels.

Values.  Each level voxel is computed from the block of ``relative`` voxels it covers in the level
before (the partial blocks at odd edges from the voxels there):

* probabilities (float): ``max`` by default: a neurite one voxel thick keeps its probability at every
  level (``mean`` turns a 1-voxel neurite of p=1 into 0.125 at s1 and 0.016 at s2, invisible at any
  useful contrast), and thresholding a level at t gives exactly the level's blocks holding a voxel
  >= t. ``mean`` (the usual intensity pyramid; what n5-spark computes) is the option.
* labels (uint64 connected components) and masks (uint8 0/1): ``mode`` by default: the most frequent
  value of the block, ties going to the smallest nonzero id (an object wins a tie with background, so
  objects two voxels thick survive a level; n5-spark's label downsampler gives ties to the smallest
  value, 0 included). ``nearest`` (the block's first voxel) is the option: faster, but it shifts the
  level by half a block against the voxel centres viewers assume and keeps or drops thin objects by
  where they fall. Ids are never averaged: every value in a level is a value of s0. (The host's
  ``connected_comps_pyramid`` runs ``N5NonIsotropicScalePyramidSpark``, whose downsampler *averages*
  the uint64 labels, making ids that exist nowhere in s0: that is deliberately not reproduced.)

Work.  A level is computed from the whole previous level, in blocks aligned to its own chunks
(:func:`.geometry.plan_blocks`), one task per block; a block computes its chunks one at a time (in
parallel threads), each from the source chunks under it, one source chunk read at a time when the
source chunk size is a multiple of the relative factor (always, for the usual even chunk sizes):
memory per thread is one output chunk plus one source chunk. A chunk whose source holds no chunk file
is not read, and a chunk that comes out all zero is not stored (an existing file is removed): a
missing chunk reads as 0. Chunk files are written whole (temporary file, then rename). A block's done
marker (as :mod:`.segment` keeps them) records the method, the factors, the source's identity and the
size and modification time (and inode) of every source chunk file under it: a re-run skips a block only while
its source is unchanged, so re-segmenting part of s0 and re-running the pyramid recomputes exactly
the blocks above the changed chunks, level by level. Level datasets are created complete under a
temporary name and renamed (:func:`.volume.create_volume`) before any block of them runs.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import testhook
from .errors import CompressionError, GeometryError, OutputError, OutputExistsError, ParameterError, VolumeError
from .geometry import XYZ, BlockPlan, Box, check_block, check_chunk_aligned, format_xyz, plan_blocks
from .provenance import ATTRIBUTE as PROVENANCE
from .provenance import stage_record
from .volume import (
    Volume,
    create_volume,
    downsampling_factors,
    dataset_identity,
    discard_dataset,
    input_attributes,
    io_executor,
    io_thread_count,
    normalise_dataset_path,
    open_volume,
    split_by_chunks,
)

log = logging.getLogger(__name__)

PROBABILITY_METHODS = ("max", "mean")  # float datasets; the first is the default
LABEL_METHODS = ("mode", "nearest")  # integer datasets (labels, masks); the first is the default
MAX_LEVELS = 32  # no volume needs more (2**32 voxels per axis)
DEFAULT_UNIT = "um"  # the host's `resolution` param is in microns
_LEVEL = re.compile(r"s(\d+)")


# --------------------------------------------------------------------------------------------
# Level geometry
# --------------------------------------------------------------------------------------------


def parse_resolution(text: str | Sequence[float], name: str = "voxel size") -> tuple[float, float, float]:
    """A voxel size x,y,z (``"0.104,0.104,0.18"`` or 3 numbers; one number means all three): three
    finite positive numbers, else :class:`GeometryError`."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) == 1 and parts[0]:
            parts = parts * 3
    else:
        parts = list(text)
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise GeometryError(f"{name} {text!r} is not 'x,y,z' with numeric values (e.g. 0.104,0.104,0.18)") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise GeometryError(f"{name} {text!r} must be 3 finite numbers > 0, x,y,z (e.g. 0.104,0.104,0.18)")
    return values  # type: ignore[return-value]


def level_factors(index: int, resolution: Sequence[float] | None = None) -> XYZ:
    """Absolute downsampling factors x,y,z of level ``index`` (s0 is 0): ``2**index`` on the finest
    axes, and on an axis ``r_a / r_min`` times coarser ``2**max(0, round(index - log2(r_a / r_min)))``
    (half-way rounds up), so a coarse axis waits until halving it keeps the voxel roughly isotropic."""
    if resolution is None:
        return (2**index,) * 3  # type: ignore[return-value]
    finest = min(resolution)
    return tuple(2 ** max(0, math.floor(index - math.log2(r / finest) + 0.5)) for r in resolution)  # type: ignore[return-value]


@dataclass(frozen=True)
class Level:
    """One level of a pyramid: ``s<index>`` of the group."""

    index: int
    dataset: str  # its path in the container, e.g. segmented/s1
    shape: XYZ
    chunks: XYZ
    factors: XYZ  # absolute: relative to s0
    relative: XYZ  # relative to the level before

    @property
    def name(self) -> str:
        return f"s{self.index}"


def plan_levels(
    shape: Sequence[int],
    chunks: Sequence[int],
    resolution: Sequence[float] | None = None,
    max_levels: int | None = None,
    group: str = "",
) -> tuple[Level, ...]:
    """The levels s1, s2, ... of a pyramid over an s0 of ``shape`` and ``chunks`` (x,y,z).

    Level k has :func:`level_factors` and ``ceil(shape / factors)`` voxels, the chunks of s0. Levels
    are added while the level before spans more than one chunk on some axis, up to ``max_levels``
    (None: no limit but that one).
    """
    if max_levels is not None and not 1 <= max_levels <= MAX_LEVELS:
        raise ParameterError(f"maximum number of levels {max_levels} must be in 1..{MAX_LEVELS}")
    shape, chunks = tuple(int(v) for v in shape), tuple(int(v) for v in chunks)
    prefix = f"{group}/" if group else ""
    levels: list[Level] = []
    previous_shape, previous_factors = shape, (1, 1, 1)
    for index in range(1, (max_levels or MAX_LEVELS) + 1):
        if all(n <= c for n, c in zip(previous_shape, chunks)):
            break  # the level before fits in one chunk: it is the last
        factors = level_factors(index, resolution)
        level_shape = tuple(-(-n // f) for n, f in zip(shape, factors))
        if level_shape == previous_shape:
            break  # nothing left to halve along the axes this level would
        relative = tuple(f // p for f, p in zip(factors, previous_factors))
        levels.append(Level(index, f"{prefix}s{index}", level_shape, chunks, factors, relative))  # type: ignore[arg-type]
        previous_shape, previous_factors = level_shape, factors
    return tuple(levels)


# --------------------------------------------------------------------------------------------
# Downsampling (pure numpy)
# --------------------------------------------------------------------------------------------


def default_method(dtype: np.dtype) -> str:
    """``max`` for float data (probabilities), ``mode`` for integer data (labels, masks)."""
    return PROBABILITY_METHODS[0] if np.dtype(dtype).kind == "f" else LABEL_METHODS[0]


def check_method(method: str | None, dtype: np.dtype) -> str:
    """The method for data of ``dtype``: the default for None; :class:`ParameterError` for a method
    that does not fit (averaging or max of ids, mode of probabilities) or is unknown."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        allowed, what = PROBABILITY_METHODS, f"probabilities ({dtype})"
    elif dtype.kind in "uib":
        allowed, what = LABEL_METHODS, f"labels and masks ({dtype}: ids are never averaged)"
    else:
        raise VolumeError(f"a pyramid of {dtype} data cannot be built: float probabilities or integer labels and masks are")
    if method is None:
        return allowed[0]
    if method not in allowed:
        raise ParameterError(f"downsampling method {method!r} does not apply to {what}: use one of {', '.join(allowed)}")
    return method


def downsample(data: np.ndarray, factors: Sequence[int], method: str) -> np.ndarray:
    """Downsample a z,y,x array by x,y,z ``factors`` (``ceil(shape / factors)`` voxels out).

    Each output voxel comes from its block of input voxels (a partial block at an edge from the voxels
    there) by ``method``: ``max``, ``mean`` (float64 sums in a fixed order, rounded to the input's
    dtype), ``mode`` (ties: the smallest nonzero value) or ``nearest`` (the block's first voxel). An
    output voxel depends only on its block, so the result does not depend on how a volume is cut.
    """
    f = tuple(int(v) for v in factors)[::-1]  # z,y,x
    if method == "nearest":
        return np.ascontiguousarray(data[:: f[0], :: f[1], :: f[2]])
    out_shape = tuple(-(-n // k) for n, k in zip(data.shape, f))
    offsets = list(itertools.product(*(range(k) for k in f)))
    pieces = [data[dz :: f[0], dy :: f[1], dx :: f[2]] for dz, dy, dx in offsets]  # the first has out_shape
    if method == "max":
        out = pieces[0].copy()
        for piece in pieces[1:]:
            view = out[tuple(slice(0, n) for n in piece.shape)]
            np.maximum(view, piece, out=view)
        return out
    if method == "mean":
        total = pieces[0].astype(np.float64)
        for piece in pieces[1:]:
            total[tuple(slice(0, n) for n in piece.shape)] += piece
        counts = [np.minimum(k, n - np.arange(m) * k) for n, k, m in zip(data.shape, f, out_shape)]
        total /= counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
        return total.astype(data.dtype)
    if method == "mode":
        out = np.empty(out_shape, dtype=data.dtype)
        rows = max(1, (1 << 20) // max(1, out_shape[1] * out_shape[2]))  # ~1M output voxels at a time
        for z0 in range(0, out_shape[0], rows):
            z1 = min(z0 + rows, out_shape[0])
            out[z0:z1] = _mode(data[z0 * f[0] : z1 * f[0]], f)
        return out
    raise ParameterError(f"unknown downsampling method {method!r}: use one of {', '.join(PROBABILITY_METHODS + LABEL_METHODS)}")


def _mode(data: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """The most frequent value of each block of ``f`` (z,y,x), ties to the smallest nonzero value."""
    out_shape = tuple(-(-n // k) for n, k in zip(data.shape, f))
    k = math.prod(f)
    values = np.zeros((k, *out_shape), dtype=data.dtype)
    valid = np.zeros((k, *out_shape), dtype=bool)
    for j, (dz, dy, dx) in enumerate(itertools.product(*(range(n) for n in f))):
        piece = data[dz :: f[0], dy :: f[1], dx :: f[2]]
        where = tuple(slice(0, n) for n in piece.shape)
        values[(j, *where)] = piece
        valid[(j, *where)] = True
    counts = np.empty((k, *out_shape), dtype=np.int16)
    for j in range(k):
        counts[j] = ((values == values[j]) & valid).sum(axis=0)
    counts[~valid] = -1
    best = counts == counts.max(axis=0)
    nonzero = best & (values != 0)
    best &= nonzero | ~nonzero.any(axis=0)  # an object wins a tie with background
    top = np.iinfo(data.dtype).max if data.dtype.kind in "ui" else True
    return np.where(best, values, top).min(axis=0).astype(data.dtype)


# --------------------------------------------------------------------------------------------
# The pyramid of a dataset: planning and creating its levels
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pyramid:
    """The planned pyramid of one s0 dataset."""

    source: Volume  # s0
    group: str  # the group holding s0 and the levels ('' for the container's root)
    method: str
    resolution: tuple[float, float, float] | None  # s0's voxel size x,y,z, when known
    unit: str | None
    levels: tuple[Level, ...]

    @property
    def container(self) -> str:
        return self.source.container


def voxel_size(attributes: dict) -> tuple[tuple[float, float, float] | None, str | None]:
    """The voxel size x,y,z and unit in a dataset's attributes: ``pixelResolution`` (n5-viewer's
    ``{"dimensions": [...], "unit": ...}`` or a plain list) or else ``resolution``; (None, None) when
    neither is there. A value that is not 3 positive numbers raises :class:`GeometryError`."""
    value, unit = attributes.get("pixelResolution"), None
    if isinstance(value, dict):
        value, unit = value.get("dimensions"), value.get("unit")
    if value is None:
        value = attributes.get("resolution")
    if value is None:
        return None, None
    if unit is None and isinstance(attributes.get("units"), list) and attributes["units"]:
        unit = attributes["units"][0]
    return parse_resolution(value if isinstance(value, list) else str(value), "the dataset's voxel size"), unit


def plan_pyramid(
    source: Volume,
    method: str | None = None,
    resolution: str | Sequence[float] | None = None,
    unit: str | None = None,
    max_levels: int | None = None,
    warn: Callable[[str], None] = log.warning,
) -> Pyramid:
    """Plan the pyramid of ``source``, which must be a dataset named ``s0``.

    The voxel size is s0's own (``pixelResolution`` or ``resolution``); ``resolution`` (x,y,z) is used
    when s0 has none (the host's ``resolution`` param), and a different one given beside s0's is
    ignored with a warning. ``method`` defaults by dtype (:func:`check_method`). Nothing is written.
    """
    dataset = normalise_dataset_path(source.dataset)
    group, _, name = dataset.rpartition("/")
    if name != "s0":
        raise VolumeError(
            f"{source} is not named s0: the pyramid's levels are the siblings s1, s2, ... of the full-resolution "
            f"dataset <group>/s0 (the n5-viewer convention); give the dataset as {group + '/' if group else ''}s0"
        )
    method = check_method(method, source.dtype)
    downsampling_factors(source)  # a malformed downsamplingFactors of s0 is refused before anything is written
    given = parse_resolution(resolution, "voxel size") if resolution not in (None, "") else None
    try:
        own, own_unit = voxel_size(input_attributes(source))
    except GeometryError as exc:
        if given is None:
            raise GeometryError(f"{source}: {exc}; give the voxel size x,y,z instead") from None
        own, own_unit = None, None
    if own is not None and given is not None and not np.allclose(own, given, rtol=1e-6):
        warn(
            f"voxel size {','.join(map(repr, given))} ignored: {source} records its own, "
            f"{','.join(map(repr, own))} {own_unit or ''}".rstrip()
        )
    size = own if own is not None else given
    levels = plan_levels(source.shape, source.chunks, size, max_levels, group)
    return Pyramid(source, group, method, size, (own_unit if own is not None else unit) or (DEFAULT_UNIT if size else None), levels)


def existing_levels(pyramid: Pyramid) -> dict[int, str]:
    """The ``s<k>`` entries (k >= 1) present in the pyramid's group: index -> dataset path."""
    folder = os.path.join(pyramid.container, pyramid.group) if pyramid.group else pyramid.container
    found = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    for name in names:
        match = _LEVEL.fullmatch(name)
        if match and int(match.group(1)) >= 1:
            found[int(match.group(1))] = f"{pyramid.group}/{name}" if pyramid.group else name
    return found


def _compression(source: Volume) -> tuple[str, int | None]:
    """s0's compression as a :func:`.codecs.compressor` name and level (gzip at its default when it
    has another codec)."""
    from . import codecs

    codec = source.array.compressor
    config = codec.get_config() if codec is not None else None
    if config is not None and config.get("id") == "n5_wrapper":
        config = config.get("compressor_config")
    if config is None:
        return "raw", None
    name, level = {
        "gzip": ("gzip", config.get("level")),
        "zlib": ("gzip", config.get("level")),
        "bz2": ("bzip2", config.get("level")),
        "lzma": ("xz", config.get("preset")),
        "blosc": ("blosc", config.get("clevel")),
    }.get(config.get("id"), ("gzip", None))
    try:
        codecs.compressor(name, level)
    except CompressionError:
        level = None
    return name, level


def level_attributes(pyramid: Pyramid, level: Level) -> dict:
    """A level's attributes: s0's resolution-like attributes, unchanged (readers multiply them by
    the factors), its absolute ``downsamplingFactors``, and ``pixelResolution`` when only the given
    voxel size knows it."""
    attributes = dict(input_attributes(pyramid.source))
    base = downsampling_factors(pyramid.source)  # [1,1,1] unless s0 is itself downsampled from something finer
    attributes["downsamplingFactors"] = [f * b for f, b in zip(level.factors, base)]
    if pyramid.resolution is not None:
        try:
            own, _ = voxel_size(attributes)
        except GeometryError:
            own = None
        if own is None or "pixelResolution" not in attributes:
            attributes["pixelResolution"] = {"dimensions": list(pyramid.resolution), "unit": pyramid.unit}
    return attributes


def group_attributes(pyramid: Pyramid) -> dict:
    """The multiscale attributes of the pyramid's group (see the module docstring)."""
    base = downsampling_factors(pyramid.source)
    attributes: dict = {
        "multiScale": True,
        "scales": [list(base)] + [[f * b for f, b in zip(level.factors, base)] for level in pyramid.levels],
        "axes": ["x", "y", "z"],
    }
    if pyramid.resolution is not None:
        attributes["pixelResolution"] = {"dimensions": list(pyramid.resolution), "unit": pyramid.unit}
        attributes["resolution"] = list(pyramid.resolution)
        attributes["units"] = [pyramid.unit] * 3
    return attributes


def create_levels(pyramid: Pyramid, overwrite: bool = False) -> list[Volume]:
    """Create the pyramid's level datasets (empty, complete, each renamed into place), then set the
    group's multiscale attributes.

    A level already there with the planned shape, chunks and dtype is kept (its finished blocks stay
    valid; its attributes are brought up to date). One that differs, and ``s<k>`` datasets beyond the
    planned levels (from a pyramid planned with more levels), raise :class:`OutputExistsError`, before
    anything is written, unless ``overwrite``: then they are replaced or removed.
    """
    import zarr

    planned = {level.index for level in pyramid.levels}
    extra = sorted(set(existing_levels(pyramid)) - planned)
    if extra and not overwrite:
        names = ", ".join(f"s{k}" for k in extra)
        raise OutputExistsError(
            f"{pyramid.container}:/{pyramid.group} holds {names} beyond the {len(pyramid.levels)} levels planned "
            "now (from a pyramid with more levels): viewers would show them; remove them, or replace them explicitly"
        )
    for level in pyramid.levels:  # refuse what would stop the creation half-way, before writing anything
        path = Path(pyramid.container, level.dataset)
        if not (path.exists() or path.is_symlink()) or (path.is_dir() and not path.is_symlink() and not any(path.iterdir())):
            continue
        try:
            existing = open_volume(pyramid.container, level.dataset)
        except VolumeError:
            existing = None
        if existing is None or path.is_symlink():
            raise OutputError(
                f"{pyramid.container}:/{level.dataset} exists and is not a dataset the pyramid can use (a group, a file, "
                "a link or a folder without dataset attributes): it is never replaced; remove it"
            )
        if not overwrite:
            if (existing.shape, existing.chunks, existing.dtype) != (level.shape, level.chunks, pyramid.source.dtype):
                raise OutputExistsError(
                    f"{existing} already exists with shape {format_xyz(existing.shape)}, chunks "
                    f"{format_xyz(existing.chunks)}, {existing.dtype}, not the planned {format_xyz(level.shape)}, "
                    f"{format_xyz(level.chunks)}, {pyramid.source.dtype}; replace it explicitly"
                )
    present = existing_levels(pyramid)
    for k in extra:  # only with overwrite; a group, file or link named s<k> is never removed
        try:
            open_volume(pyramid.container, present[k])
        except VolumeError:
            raise OutputError(
                f"{pyramid.container}:/{present[k]} is not a dataset (a group, a file or a link), beyond the planned "
                "levels: viewers would take it for a level; remove it"
            ) from None
    for k in extra:
        discard_dataset(Path(pyramid.container, present[k]))
    name, compression_level = _compression(pyramid.source)
    volumes = []
    for level in pyramid.levels:
        attributes = level_attributes(pyramid, level)
        record = stage_record("build_pyramid", {"level": level.dataset, "factors": list(level.factors)}, pyramid.source)
        volume = create_volume(
            pyramid.container,
            level.dataset,
            level.shape,
            level.chunks,
            pyramid.source.dtype,
            attributes={**attributes, PROVENANCE: record},  # a kept level keeps its creation record
            compression_level=compression_level,
            overwrite=overwrite,
            compression=name,
        )
        now = dict(volume.array.attrs)
        stale = {key: value for key, value in attributes.items() if now.get(key) != value}
        if stale:  # a kept level: its attributes follow the plan (written whole, by rename)
            volume.array.attrs.update(stale)
        volumes.append(volume)
    group = zarr.open_group(store=pyramid.source.array.store, path=pyramid.group, mode="a")
    group.attrs.update(group_attributes(pyramid))
    return volumes


def level_blocks(level: Level, partition_size: str | int | Sequence[int] = 512) -> BlockPlan:
    """The blocks of a level (one task each): :func:`.geometry.plan_blocks` over the level, aligned
    to its chunks."""
    return plan_blocks(level.shape, level.chunks, partition_size)


# --------------------------------------------------------------------------------------------
# Computing blocks of a level
# --------------------------------------------------------------------------------------------


@dataclass
class LevelBlockResult:
    level: int
    block: Box
    chunks: int = 0  # output chunks of the block
    written: int = 0  # ... stored (the others are all zero: no file)
    seconds: float = 0.0
    skipped: bool = False

    def summary(self) -> str:
        if self.skipped:
            return f"s{self.level} block {self.block}: already done (marker present, source unchanged), skipped"
        return (
            f"s{self.level} block {self.block}: {self.chunks} chunk{'s' if self.chunks != 1 else ''} "
            f"({self.written} written, {self.chunks - self.written} all zero) in {self.seconds:.1f} s"
        )


@dataclass
class LevelPair:
    """A level and the level it is computed from, as they are on disk."""

    index: int
    source: Volume  # s<index-1>
    target: Volume  # s<index>
    relative: XYZ
    factors: XYZ = field(default=(1, 1, 1))


def open_level(container: str, s0_dataset: str, index: int) -> LevelPair:
    """Open level ``index`` (>= 1) of the pyramid of ``container:s0_dataset`` and the level before
    it, checked against each other (dtype, factors, shape); :class:`VolumeError` when the level was
    not created or does not match."""
    dataset = normalise_dataset_path(s0_dataset)
    group, _, name = dataset.rpartition("/")
    if name != "s0":
        raise VolumeError(f"{container}:/{dataset} is not named s0: give the pyramid's full-resolution dataset <group>/s0")
    if index < 1:
        raise ParameterError(f"level {index} is not a pyramid level: levels are 1, 2, ... (s0 is the input)")
    prefix = f"{group}/" if group else ""
    source = open_volume(container, f"{prefix}s{index - 1}")
    try:
        target = open_volume(container, f"{prefix}s{index}", mode="r+")
    except VolumeError as exc:
        raise VolumeError(f"{exc}; create the pyramid's levels first") from None
    if target.dtype != source.dtype:
        raise VolumeError(f"{target} is {target.dtype} but {source} is {source.dtype}: create the levels again")
    before, factors = downsampling_factors(source), downsampling_factors(target)
    if any(f % b for f, b in zip(factors, before)):
        raise VolumeError(
            f"{target} has downsamplingFactors {format_xyz(factors)}, not a multiple of {source}'s {format_xyz(before)}: "
            "create the levels again"
        )
    relative = tuple(f // b for f, b in zip(factors, before))
    expected = tuple(-(-n // r) for n, r in zip(source.shape, relative))
    if target.shape != expected:
        raise VolumeError(
            f"{target} has shape {format_xyz(target.shape)}, not {format_xyz(expected)} ({source} "
            f"{format_xyz(source.shape)} downsampled by {format_xyz(relative)}): create the levels again"
        )
    return LevelPair(index, source, target, relative, factors)  # type: ignore[arg-type]


def _source_box(pair: LevelPair, box: Box) -> Box:
    """The voxels of the level before that a box of the level is computed from."""
    return Box(
        tuple(s * r for s, r in zip(box.start, pair.relative)),  # type: ignore[arg-type]
        tuple(min(e * r, n) for e, r, n in zip(box.end, pair.relative, pair.source.shape)),  # type: ignore[arg-type]
    )


def _chunk_states(volume: Volume, box: Box) -> dict[tuple[int, int, int], tuple[int, ...] | None]:
    """Per chunk of ``volume`` meeting ``box``: its file's (inode, size, mtime_ns, ctime_ns), None when
    never written. A chunk written again (to a new file renamed over it, as every writer here does, or
    in place) changes it, even within the file system's timestamp granularity."""
    states = {}
    for piece in split_by_chunks(box, volume.chunks):
        index = tuple(s // c for s, c in zip(piece.start, volume.chunks))
        try:
            st = os.stat(volume.chunk_file(index))
            states[index] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            states[index] = None
    return states  # type: ignore[return-value]


def _pieces(pair: LevelPair, chunk: Box) -> list[Box]:
    """An output chunk cut so that each piece is computed from one source chunk (when the source
    chunk size is a multiple of the relative factor on every axis; else the chunk is one piece)."""
    step = tuple(c // r for c, r in zip(pair.source.chunks, pair.relative))
    if any(c % r for c, r in zip(pair.source.chunks, pair.relative)):
        return [chunk]
    return split_by_chunks(chunk, step)  # type: ignore[arg-type]


def compute_chunk(pair: LevelPair, chunk: Box, method: str, written: set | None = None) -> np.ndarray | None:
    """The values of one output chunk (z,y,x), or None when they are all zero. Source pieces with no
    chunk file (``written``: the source chunk indices that have one; None: look) are not read."""
    out = None
    for piece in _pieces(pair, chunk):
        source_box = _source_box(pair, piece)
        if written is not None:
            cells = split_by_chunks(source_box, pair.source.chunks)
            if not any(tuple(s // c for s, c in zip(cell.start, pair.source.chunks)) in written for cell in cells):
                continue
        data = downsample(pair.source.read_zyx(source_box), pair.relative, method)
        if not data.any():
            continue
        if out is None:
            out = np.zeros(chunk.shape[::-1], dtype=pair.target.dtype)
        out[piece.slices(chunk.start)[::-1]] = data
    return out


def build_level_blocks(
    pair: LevelPair,
    blocks: Sequence[Box],
    method: str | None = None,
    io_threads: int | None = None,
    skip_done: bool = True,
    on_result: Callable[[LevelBlockResult], None] | None = None,
    executor: Executor | None = None,
) -> list[LevelBlockResult]:
    """Compute ``blocks`` of a level (from :func:`open_level`) from the level before it.

    Each block must lie in the level and on its chunk grid (parallel blocks never share a chunk).
    A block whose done marker records this method, these factors and the source chunks as they are
    now is skipped (unless ``skip_done`` is false); otherwise its chunks are computed (in parallel
    threads) and written whole, all-zero chunks removed, and the marker written last.
    """
    from .segment import block_is_done, check_output_identity, invalidate_overlapping_markers, mark_block_done, run_fingerprint
    from .volume import block_identity

    method = check_method(method, pair.source.dtype)
    boxes = []
    for block in blocks:
        box = block if isinstance(block, Box) else Box(*block)
        check_block(box.start, box.end, pair.target.shape)
        check_chunk_aligned(box, pair.target.chunks, pair.target.shape)
        boxes.append(box)
    identity = block_identity(pair.target.path)
    if identity is None:
        raise VolumeError(f"the level dataset {pair.target} no longer exists: create the pyramid's levels again")
    own = executor is None
    pool = io_executor(io_thread_count(io_threads)) if own else executor
    results = []
    try:
        for box in boxes:
            t0 = time.perf_counter()
            result = LevelBlockResult(pair.index, box)
            source_box = _source_box(pair, box)
            states = _chunk_states(pair.source, source_box)
            settings = {
                "pyramid": method,
                "relative": list(pair.relative),
                "source": dataset_identity(pair.source),
                "source_chunks": sorted((list(k), v) for k, v in states.items() if v is not None),
            }
            fingerprint = run_fingerprint(settings)
            chunks = split_by_chunks(box, pair.target.chunks)
            result.chunks = len(chunks)
            if skip_done and block_is_done(pair.target, box, fingerprint):
                result.skipped = True
            else:
                check_output_identity(pair.target, identity)
                invalidate_overlapping_markers(pair.target, box)
                pair.target.remove_partial_chunk_files(box)
                written = {k for k, v in states.items() if v is not None}

                def one(chunk: Box) -> bool:
                    data = compute_chunk(pair, chunk, method, written)
                    check_output_identity(pair.target, identity)
                    if data is None:
                        index = tuple(s // c for s, c in zip(chunk.start, pair.target.chunks))
                        try:
                            os.unlink(pair.target.chunk_file(index))
                        except FileNotFoundError:
                            pass
                        return False
                    pair.target.write_chunk(chunk.start, data)
                    return True

                result.written = sum(pool.map(one, chunks))
                testhook.checkpoint("pyramid:block-written")
                info = {  # what made the block's values; the source chunks' state is in the fingerprint
                    "block": [list(box.start), list(box.end)],
                    "settings": {k: settings[k] for k in ("pyramid", "relative", "source")} | {"level": pair.index},
                    "seconds": time.perf_counter() - t0,
                }
                mark_block_done(pair.target, box, fingerprint, identity, info)
            result.seconds = time.perf_counter() - t0
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        if own:
            pool.shutdown()
    return results


def build_pyramid(
    pyramid: Pyramid,
    partition_size: str | int | Sequence[int] = 512,
    overwrite: bool = False,
    io_threads: int | None = None,
    skip_done: bool = True,
    on_result: Callable[[LevelBlockResult], None] | None = None,
) -> list[LevelBlockResult]:
    """Create the levels, then compute every block of every level in order, in this process (a small
    volume on one machine; a pipeline runs the levels' blocks as separate tasks instead)."""
    create_levels(pyramid, overwrite=overwrite)
    results = []
    with io_executor(io_thread_count(io_threads)) as pool:
        for level in pyramid.levels:
            pair = open_level(pyramid.container, pyramid.source.dataset, level.index)
            blocks = level_blocks(level, partition_size).blocks
            results += build_level_blocks(pair, blocks, pyramid.method, skip_done=skip_done, on_result=on_result, executor=pool)
    return results
