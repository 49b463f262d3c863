"""What a segmentation run will cost, known before any block runs.

For a block plan (:func:`.geometry.plan_blocks`) of an input dataset, :func:`run_cost` counts

* the blocks and the voxels of the processed region;
* with the model's tile grid (:attr:`.inference.Predictor.grid`; reading the model file needs no
  TensorFlow): every tile run of every block (a tile that straddles two blocks runs in each), and
  which of them lie wholly in empty space: no chunk file of the input was ever written anywhere in
  the tile's input window (its output box grown by the model's context, with the image-edge
  reflection the blocks read). Such a tile reads as one value and gets the model's recorded answer
  without running it (``segment_volume.py``'s constant-tile skipping, on by default), so its voxels
  cost nothing; a block all of whose tiles are empty is wholly in empty space. This is the cheap
  check (one directory listing per chunk folder, no chunk read): chunks written but holding one value
  count as data, so the empty space found is a lower bound;
* the voxels to compute: the region's voxels less those that empty tiles write;
* the compute time: voxels to compute / a rate in Mvox/s, per device (a rate measured end to end on
  one device; divide by the number of devices running blocks at once for the wall time). The default,
  :data:`DEFAULT_RATE_MVOX_S`, is the README's fp32 whole-volume figure on the 2-core CI CPU; a GPU is
  many times faster: measure it (:func:`measure_tile_seconds` times a few tiles of this model on this
  machine; the time is then tile runs x seconds per tile, compute alone) or give the rate;
* the output's size on disk: every output chunk the region meets is written whole (the output has
  the input's dims and chunks), uncompressed and estimated for gzip with ratios measured on this
  project's outputs (:data:`GZIP_RATIOS`).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelError, ParameterError
from .geometry import XYZ, BlockPlan, Box, TileGrid, format_xyz, reflect_index

if TYPE_CHECKING:  # pragma: no cover
    from .inference import Predictor
    from .volume import Volume

# Mvox/s, fp32, whole volume, end to end, on the 2-core CI CPU (README, Benchmark:
# bench/bench_segment.py --precision fp32,bf16 --blocks 4 gave 4.66). Per device; measure yours.
DEFAULT_RATE_MVOX_S = 4.7

# gzip (level 1) size / uncompressed size of an output chunk: (its input chunk has data, it has
# none). Measured on bench/results: float32 probabilities 0.909 where the model ran on tissue
# (512^3 of 128^3 chunks) and 0.0095-0.011 in empty space (the model's near-constant answer);
# uint8 masks 0.004 (0.5% foreground) and 0.001.
GZIP_RATIOS = {"float32": (0.91, 0.011), "uint8": (0.004, 0.001)}


class WrittenChunks:
    """Which chunks of a dataset have a file, answering "is any chunk written in this box" in O(1)
    (a summed-volume table over the chunk grid)."""

    def __init__(self, volume: Volume) -> None:
        self.chunks = volume.chunks
        self.grid = tuple(-(-n // c) for n, c in zip(volume.shape, volume.chunks))
        self.shape = volume.shape
        occupied = np.zeros(self.grid, dtype=bool)  # x,y,z chunk indices
        by_folder: dict[Path, list[tuple[str, tuple[int, int, int]]]] = {}
        for index in itertools.product(*(range(n) for n in self.grid)):
            path = volume.chunk_file(index)
            by_folder.setdefault(path.parent, []).append((path.name, index))  # type: ignore[arg-type]
        for folder, entries in by_folder.items():
            try:
                names = set(os.listdir(folder))
            except OSError:  # no chunk written there
                continue
            for name, index in entries:
                if name in names:
                    occupied[index] = True
        self.occupied = occupied
        table = np.zeros(tuple(n + 1 for n in self.grid), dtype=np.int64)
        table[1:, 1:, 1:] = occupied.cumsum(0).cumsum(1).cumsum(2)
        self._table = table

    @property
    def total(self) -> int:
        return int(self.occupied.size)

    @property
    def written(self) -> int:
        return int(self.occupied.sum())

    def count(self, box: Box) -> int:
        """Chunks with a file among those meeting ``box`` (voxels, inside the image)."""
        if box.empty:
            return 0
        (a0, b0, c0) = (s // c for s, c in zip(box.start, self.chunks))
        (a1, b1, c1) = (-(-e // c) for e, c in zip(box.end, self.chunks))
        t = self._table
        return int(
            t[a1, b1, c1] - t[a0, b1, c1] - t[a1, b0, c1] - t[a1, b1, c0]
            + t[a0, b0, c1] + t[a0, b1, c0] + t[a1, b0, c0] - t[a0, b0, c0]
        )

    def any_in(self, box: Box) -> bool:
        return self.count(box) > 0


def read_window(box: Box, image_shape: Sequence[int]) -> Box:
    """The voxels of the image that reading ``box`` touches, the parts beyond the image reflected
    back as the blocks read them (:func:`.geometry.reflect_index`): per axis, from the smallest to
    the largest index read."""
    index = [reflect_index(np.arange(s, e), n) for s, e, n in zip(box.start, box.end, image_shape)]
    return Box(tuple(int(i.min()) for i in index), tuple(int(i.max()) + 1 for i in index))  # type: ignore[arg-type]


@dataclass
class RunCost:
    """The cost of a run's blocks (see the module docstring); ``None`` where it is not known."""

    input: dict
    region: Box
    partition_size: XYZ
    blocks: int
    region_voxels: int
    input_chunks: int
    input_chunks_written: int
    voxels_to_compute: int
    rate_mvox_s: float
    rate_source: str
    compute_seconds: float
    output_dtype: str
    output_chunks: int
    output_bytes: int
    output_bytes_gzip: int
    model: dict | None = None
    tile_runs: int | None = None
    empty_tiles: int | None = None
    empty_blocks: int | None = None
    tile_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        record = asdict(self)
        record["region"] = {"start": list(self.region.start), "end": list(self.region.end)}
        record["partition_size"] = list(self.partition_size)
        record["compute_device_hours"] = self.compute_seconds / 3600
        return record

    def summary_lines(self) -> list[str]:
        """The report in a few lines, for people."""
        lines = [
            f"blocks: {self.blocks} of {format_xyz(self.partition_size)} over {self.region}, "
            f"{self.region_voxels:,} voxels; input chunks written: {self.input_chunks_written:,} of {self.input_chunks:,}",
        ]
        if self.tile_runs is None:
            lines.append("empty space: not checked (the model's tile grid is needed: give the model)")
        else:
            model = self.model or {}
            lines.append(
                f"tiles: {self.tile_runs:,} runs of {format_xyz(model.get('tile_input_shape', ()))} (context "
                f"{format_xyz(model.get('context', ()))}), {self.empty_tiles:,} wholly in empty space (no model); "
                f"blocks wholly in empty space: {self.empty_blocks:,}"
            )
        share = self.voxels_to_compute / self.region_voxels if self.region_voxels else 0.0
        lines.append(f"voxels to compute: {self.voxels_to_compute:,} ({share:.0%} of the region)")
        lines.append(
            f"compute: {_duration(self.compute_seconds)} per device at {self.rate_mvox_s:.3g} Mvox/s ({self.rate_source})"
        )
        lines.append(
            f"output: {self.output_dtype}, {self.output_chunks:,} chunks, {_bytes(self.output_bytes)} uncompressed, "
            f"~{_bytes(self.output_bytes_gzip)} with gzip (estimate)"
        )
        return lines


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.3g} TB"  # pragma: no cover


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def check_rate(rate_mvox_s: float) -> float:
    if not (math.isfinite(rate_mvox_s) and rate_mvox_s > 0):
        raise ParameterError(f"compute rate {rate_mvox_s} Mvox/s must be a finite number > 0")
    return float(rate_mvox_s)


def load_model(
    model_path: str | Path, image_shape: Sequence[int], input_shape: Sequence[int] | None = None, precision: str = "fp32"
) -> Predictor:
    """The model (weights and tile grid; no TensorFlow until a tile is predicted) as the blocks will
    run it: the default tile shape for ``image_shape`` unless ``input_shape`` is given."""
    try:
        import h5py  # noqa: F401 - the model file is HDF5
    except ImportError:
        raise ModelError(
            f"reading the model file {model_path} needs h5py, which this installation lacks "
            "(the segment-volume image has it; the create-volume image does not)"
        ) from None
    from .inference import Predictor

    return Predictor(model_path, input_shape=input_shape, image_shape=image_shape, precision=precision)


def measure_tile_seconds(predictor: Predictor, tiles: int = 2, seed: int = 0) -> tuple[float, float]:
    """Seconds per tile of ``predictor`` on this machine, and the seconds of the first tile (TensorFlow
    start-up and the engine's build: not counted in the rate): one warm-up tile, then ``tiles`` tiles
    of synthetic intensities (noise around a uint16-like background, scaled as the blocks scale them)."""
    if tiles < 1:
        raise ParameterError(f"{tiles} tiles to time: at least 1 is needed")
    rng = np.random.default_rng(seed)
    shape = predictor.input_shape if predictor.axes == "xyz" else predictor.input_shape[::-1]
    tile = rng.normal(1000.0, 300.0, size=shape).clip(0, 65535).astype(np.float32)
    t = time.perf_counter()
    predictor.predict(tile, 0.00045)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(tiles):
        predictor.predict(tile, 0.00045)
    return (time.perf_counter() - t) / tiles, first


def run_cost(
    volume: Volume,
    plan: BlockPlan,
    grid: TileGrid | None = None,
    rate_mvox_s: float | None = None,
    tile_seconds: float | None = None,
    binary: bool = False,
    model: dict | None = None,
) -> RunCost:
    """The cost of running ``plan``'s blocks on ``volume`` (see the module docstring).

    ``grid``: the model's tile grid (None: empty space is not checked). ``tile_seconds`` (measured)
    gives the time as tile runs that need the model x seconds per tile; otherwise voxels to compute /
    ``rate_mvox_s`` (default :data:`DEFAULT_RATE_MVOX_S`). ``binary``: the output is a uint8 mask
    instead of float32 probabilities. ``model``: what to record about the model in the report.
    """
    written = WrittenChunks(volume)
    shape = volume.shape
    region_voxels = sum(b.size for b in plan.blocks)
    tile_runs = empty_tiles = empty_blocks = None
    voxels = region_voxels
    model_runs = 0
    if grid is not None:
        tile_runs = empty_tiles = empty_blocks = 0
        voxels = 0
        windows: dict[tuple[int, int, int], bool] = {}  # tile index -> empty (a tile recurs in neighbouring blocks)
        for block in plan.blocks:
            block_empty = True
            for index in grid.tiles(block):
                empty = windows.get(index)
                if empty is None:
                    empty = windows[index] = not written.any_in(read_window(grid.input_box(index), shape))
                tile_runs += 1
                if empty:
                    empty_tiles += 1
                else:
                    block_empty = False
                    model_runs += 1
                    voxels += grid.owned(index).intersect(block).size
            empty_blocks += block_empty
    notes = []
    if tile_seconds is not None:
        if not (math.isfinite(tile_seconds) and tile_seconds > 0):
            raise ParameterError(f"seconds per tile {tile_seconds} must be a finite number > 0")
        seconds = model_runs * tile_seconds
        rate = voxels / seconds / 1e6 if seconds > 0 else math.inf
        source = f"measured here: {tile_seconds:.3g} s per tile, compute alone"
    else:
        given = rate_mvox_s is not None
        rate = check_rate(rate_mvox_s if given else DEFAULT_RATE_MVOX_S)
        seconds = voxels / (rate * 1e6)
        source = "given" if given else "default: the README's fp32 figure on a 2-core CPU; measure this device's"
    notes.append(
        "compute time is per device (blocks running on n devices at once take about 1/n of it); the rate depends "
        "on the device, the precision and the tile shape"
    )
    dtype = "uint8" if binary else "float32"
    itemsize = np.dtype(dtype).itemsize
    # output chunks: those the region meets, each written whole (clipped to the image)
    lo = [s // c for s, c in zip(plan.region.start, volume.chunks)]
    hi = [-(-e // c) for e, c in zip(plan.region.end, volume.chunks)]
    sizes = [
        np.minimum((np.arange(a, b) + 1) * c, n) - np.arange(a, b) * c
        for a, b, c, n in zip(lo, hi, volume.chunks, shape)
    ]
    chunk_voxels = sizes[0][:, None, None] * sizes[1][None, :, None] * sizes[2][None, None, :]
    occupied = written.occupied[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    total = int(chunk_voxels.sum()) * itemsize
    with_data = int(chunk_voxels[occupied].sum()) * itemsize
    full, empty = GZIP_RATIOS[dtype]
    gzip = int(with_data * full + (total - with_data) * empty)
    return RunCost(
        input={"container": str(volume.container), "dataset": "/" + volume.dataset, "shape": list(shape),
               "chunks": list(volume.chunks), "dtype": str(volume.dtype)},
        region=plan.region,
        partition_size=plan.partition_size,
        blocks=len(plan.blocks),
        region_voxels=region_voxels,
        input_chunks=written.total,
        input_chunks_written=written.written,
        voxels_to_compute=voxels,
        rate_mvox_s=rate,
        rate_source=source,
        compute_seconds=seconds,
        output_dtype=dtype,
        output_chunks=int(chunk_voxels.size),
        output_bytes=total,
        output_bytes_gzip=gzip,
        model=model,
        tile_runs=tile_runs,
        empty_tiles=empty_tiles,
        empty_blocks=empty_blocks,
        tile_seconds=tile_seconds,
        notes=notes,
    )


def model_record(predictor: Predictor) -> dict:
    """What the report records about the model: its file and checksum, and the tile grid."""
    return {
        "path": str(predictor.path),
        "sha256": predictor.fingerprint,
        "tile_input_shape": list(predictor.input_shape),
        "tile_output_shape": list(predictor.output_shape),
        "context": list(predictor.context),
        "stride": list(predictor.grid.stride),
        "precision": predictor.precision,
    }


def estimate_cost(
    volume: Volume,
    plan: BlockPlan,
    model_path: str | Path | None = None,
    input_shape: Sequence[int] | None = None,
    *,
    binary: bool = False,
    rate_mvox_s: float | None = None,
    measure: bool = False,
    precision: str = "fp32",
) -> RunCost:
    """:func:`run_cost` of ``plan``, with the model's tile grid when ``model_path`` is given (the tile
    shape ``input_shape``, else the blocks' default for the image) and, with ``measure``, the seconds
    per tile of this model on this machine in ``precision`` (this loads TensorFlow)."""
    from .inference import check_precision_name

    check_precision_name(precision)
    if measure and model_path is None:
        raise ParameterError("measuring the compute rate times tiles of the model: a model file is needed")
    if model_path is None:
        return run_cost(volume, plan, rate_mvox_s=rate_mvox_s, binary=binary)
    predictor = load_model(model_path, volume.shape, input_shape, precision if measure else "fp32")
    seconds = measure_tile_seconds(predictor)[0] if measure else None
    return run_cost(volume, plan, predictor.grid, rate_mvox_s, seconds, binary, model_record(predictor))
