"""Block-wise segmentation of a volume with the U-Net.

``segment_block`` predicts one block ``[start, end)`` of an input dataset into an output dataset.
Tiles sit on a global grid (see :mod:`.geometry`), so the result does not depend on how the
volume is cut into blocks.  Tiles stream row by row (x fastest, z slowest: the N5 storage order): the
next row's input is read while the current one is predicted, and finished output chunk rows are
encoded and written by a thread pool while prediction goes on.  Peak memory is two rows of
input, one chunk row plus one slab of output, and the model's working set for one batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .errors import GeometryError
from .geometry import XYZ, Box, TileGrid, check_block, check_chunk_aligned, format_xyz
from .postprocess import post_process
from .scaling import check_scaling_factor, intensity_histogram, scaling_factor_from_histogram
from .volume import Volume, check_output_volume, io_executor, split_by_chunks

if TYPE_CHECKING:  # pragma: no cover
    from .unet import UNetConfig

log = logging.getLogger(__name__)

DONE_DIR = ".exllsm-done"


@dataclass(frozen=True)
class PostProcessing:
    """Hysteresis thresholds, then small-object removal (host defaults)."""

    high_threshold: float = 0.98
    low_threshold: float = 0.2
    small_region_probability_threshold: float = 0.9
    small_region_size_threshold: int = 1000


@dataclass
class SegmentationResult:
    block: Box
    tiles: int
    seconds: float
    scaling: float
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    skipped: bool = False
    flops: float = 0.0

    @property
    def voxels(self) -> int:
        return self.block.size

    @property
    def mvox_per_s(self) -> float:
        return self.voxels / self.seconds / 1e6 if self.seconds > 0 else math.inf

    def summary(self) -> str:
        if self.skipped:
            return f"block {self.block}: already done (marker present), skipped"
        return (
            f"block {self.block}: {self.tiles} tiles in {self.seconds:.1f} s, "
            f"{self.mvox_per_s:.2f} Mvox/s, scaling {self.scaling:.6g}"
        )


# --------------------------------------------------------------------------------------------
# Done markers: written after a block's data, so re-runs can skip finished blocks
# --------------------------------------------------------------------------------------------


def block_key(block: Box) -> str:
    return f"{format_xyz(block.start).replace(',', '_')}-{format_xyz(block.end).replace(',', '_')}"


def marker_path(output: Volume, block: Box) -> Path:
    return output.path / DONE_DIR / f"{block_key(block)}.json"


def run_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def block_is_done(output: Volume, block: Box, fingerprint: str) -> bool:
    path = marker_path(output, block)
    try:
        return json.loads(path.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def mark_block_done(output: Volume, block: Box, fingerprint: str, info: dict) -> None:
    path = marker_path(output, block)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, **info}, indent=1, default=str))
    tmp.replace(path)


def clear_block_done(output: Volume, block: Box) -> None:
    marker_path(output, block).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Scaling from the block itself (the original's behaviour without -s)
# --------------------------------------------------------------------------------------------


def block_scaling_factor(volume: Volume, block: Box, context: XYZ, executor=None) -> float:
    """The factor of the block's read window (block plus model context, clipped to the image).

    Histograms are counted chunk by chunk (in parallel with an executor) and added up.
    """
    window = block.grow(context).intersect(volume.box)
    pieces = split_by_chunks(window, volume.chunks)
    count = lambda piece: intensity_histogram(volume.read_zyx(piece))  # noqa: E731
    counts = sum(executor.map(count, pieces) if executor else map(count, pieces))
    return scaling_factor_from_histogram(counts).factor


# --------------------------------------------------------------------------------------------
# The block loop
# --------------------------------------------------------------------------------------------


class _OutputRows:
    """Collects predicted z-slabs of a block and writes whole chunk rows as soon as they are complete.

    Slabs are kept as separate arrays (no re-allocation as the block grows); a chunk row that
    spans two slabs is joined when it is written.  With ``keep_all`` (post-processing needs the
    whole block) nothing is written before ``flush(final=True)``.
    """

    def __init__(self, output: Volume, block: Box, dtype: np.dtype, executor, keep_all: bool) -> None:
        self.output, self.block, self.dtype, self.executor = output, block, dtype, executor
        self.keep_all = keep_all
        self.z0 = block.start[2]  # first z not yet written
        self.slabs: list[tuple[int, np.ndarray]] = []  # (first z, z,y,x array), in z order
        self.pending: list[Future] = []
        self.write_seconds = 0.0

    def new_slab(self, z0: int, z1: int) -> np.ndarray:
        slab = np.zeros((z1 - z0, self.block.shape[1], self.block.shape[0]), dtype=self.dtype)
        self.slabs.append((z0, slab))
        return slab

    def rows(self, z0: int, z1: int) -> np.ndarray:
        """The z,y,x rows ``[z0, z1)`` (a view when they lie in one slab)."""
        parts = []
        for s0, slab in self.slabs:
            a, b = max(z0, s0), min(z1, s0 + slab.shape[0])
            if a < b:
                parts.append(slab[a - s0 : b - s0])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def whole(self) -> np.ndarray:
        """All rows of the block as one z,y,x array (joins the slabs once)."""
        data = self.rows(self.block.start[2], self.block.end[2])
        self.slabs = [(self.block.start[2], data)]
        return data

    def flush(self, complete_to: int, final: bool = False) -> None:
        """Write every whole chunk row below ``complete_to`` (everything when ``final``)."""
        if self.keep_all and not final:
            return
        cz = self.output.chunks[2]
        end = complete_to if final else max(self.z0, complete_to // cz * cz)
        end = min(end, self.block.end[2])
        if end <= self.z0:
            return
        box = Box((self.block.start[0], self.block.start[1], self.z0), (self.block.end[0], self.block.end[1], end))
        cuts = [self.z0, *range((self.z0 // cz + 1) * cz, end, cz), end]
        for r0, r1 in zip(cuts[:-1], cuts[1:]):
            row = Box((box.start[0], box.start[1], r0), (box.end[0], box.end[1], r1))
            data = self.rows(r0, r1)
            for piece in split_by_chunks(row, self.output.chunks):
                part = data[piece.slices(row.start)[::-1]]
                self.pending.append(self.executor.submit(self._write, piece.start, part))
        self.z0 = end
        # slabs wholly written are dropped here; running writes keep their views alive until done
        self.slabs = [(s0, slab) for s0, slab in self.slabs if s0 + slab.shape[0] > end]
        running = []
        for f in self.pending:
            if f.done():
                f.result()  # a failed write stops the block now, before more work is done
            else:
                running.append(f)
        self.pending = running

    def _write(self, start: XYZ, data_zyx: np.ndarray) -> None:
        t = time.perf_counter()
        self.output.write_zyx(start, data_zyx)
        self.write_seconds += time.perf_counter() - t

    def wait(self) -> None:
        for f in self.pending:
            f.result()
        self.pending.clear()


def plan_block(
    input_volume: Volume,
    start: Sequence[int],
    end: Sequence[int],
    input_shape: Sequence[int],
    output_shape: Sequence[int] | None,
    config: "UNetConfig",
) -> tuple[Box, TileGrid]:
    """Validate a block and the tile shapes and return the block box and the model's tile grid."""
    from .unet import check_tile_shapes

    block = check_block(tuple(start), tuple(end), input_volume.shape)  # type: ignore[arg-type]
    tile_in, tile_out = check_tile_shapes(input_shape, output_shape, config.n_blocks)
    return block, TileGrid(tile_in, tile_out, config.tile_grid)


def segment_block(
    input_volume: Volume,
    output_volume: Volume,
    model_path: str | Path,
    start: Sequence[int],
    end: Sequence[int],
    scaling: float | None = None,
    input_shape: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    batch_size: int = 1,
    binary: bool = False,
    post_processing: PostProcessing | None = None,
    allow_unaligned: bool = False,
    skip_done: bool = True,
    io_threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] = log.warning,
) -> SegmentationResult:
    """Segment ``[start, end)`` (x,y,z, end-exclusive) of ``input_volume`` into ``output_volume``.

    Everything is validated before the first voxel is written: block inside the image, tile
    shapes valid for the model, output dims and dtype, chunk alignment (unless
    ``allow_unaligned``) and the scaling factor.  The tile shape defaults to the one stored in
    the model file (220^3 for the published model).  ``progress(tiles_done, tiles_total)`` is
    called after every batch.
    """
    from .unet import cached_predictor, read_model_weights

    t_start = time.perf_counter()
    weights = read_model_weights(model_path)  # fails fast on a bad model file
    if input_shape is None:
        input_shape = weights.input_shape or (220, 220, 220)
    block, grid = plan_block(input_volume, start, end, input_shape, output_shape, weights.config)
    check_output_volume(output_volume, input_volume.shape, binary)
    if not allow_unaligned:
        check_chunk_aligned(block, output_volume.chunks, output_volume.shape)
    if batch_size < 1:
        raise GeometryError(f"batch size {batch_size} must be >= 1")

    executor = io_executor(io_threads)  # chunk decoding and encoding
    # Reading a row waits on chunk tasks in ``executor``; it runs in its own thread so it can never
    # occupy the pool it waits on (with one I/O thread that would deadlock).
    prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="row-prefetch")
    try:
        if scaling is None:
            warn(
                "no scaling factor given (-s): computing one from this block alone; blocks then get "
                "different factors and the result shows seams between blocks. Pass a global -s."
            )
            scaling = block_scaling_factor(input_volume, block, grid.context, executor)
        scaling = check_scaling_factor(scaling)
        settings = {
            "model_sha256": _file_digest(model_path),
            "scaling": repr(float(scaling)),
            "input": str(input_volume),
            "tile": grid.input_shape,
            "binary": binary,
            "post_processing": asdict(post_processing) if post_processing else None,
        }
        fingerprint = run_fingerprint(settings)
        n_tiles = grid.count(block)
        if skip_done and block_is_done(output_volume, block, fingerprint):
            return SegmentationResult(block, n_tiles, time.perf_counter() - t_start, scaling, skipped=True)
        clear_block_done(output_volume, block)

        predictor = cached_predictor(model_path, grid.input_shape, batch_size=batch_size, binary=binary, axes="zyx")
        result = SegmentationResult(block, n_tiles, 0.0, scaling)
        result.flops = predictor.flops_per_tile() * n_tiles
        out_dtype = np.dtype(np.uint8) if binary else np.dtype(np.float32)
        rows = _OutputRows(output_volume, block, out_dtype, executor, keep_all=post_processing is not None)
        factor = np.float32(scaling)

        rx, ry, rz = grid.tile_indices(block)
        done = 0

        def row_window(ky: int, kz: int) -> Box:
            """Input of one row of tiles along x (rows are read one ahead of the computation)."""
            return Box(grid.input_box((rx[0], ky, kz)).start, grid.input_box((rx[-1], ky, kz)).end)

        def read_row(ky: int, kz: int) -> tuple[Box, np.ndarray, float]:
            t = time.perf_counter()
            window = row_window(ky, kz)
            return window, input_volume.read_reflect_zyx(window, executor), time.perf_counter() - t

        row_order = [(ky, kz) for kz in rz for ky in ry]
        next_row = prefetcher.submit(read_row, *row_order[0])
        n_row = 0
        for kz in rz:
            owned_z = grid.owned((0, 0, kz)).intersect(Box((0, 0, block.start[2]), (1, 1, block.end[2])))
            z0, z1 = owned_z.start[2], owned_z.end[2]
            slab_out = rows.new_slab(z0, z1)
            for ky in ry:
                window, data, read_s = next_row.result()
                result.read_seconds += read_s
                n_row += 1
                if n_row < len(row_order):
                    next_row = prefetcher.submit(read_row, *row_order[n_row])
                tiles = [(kx, ky, kz) for kx in rx]
                for b in range(0, len(tiles), batch_size):
                    batch_idx = tiles[b : b + batch_size]
                    # tiles stay in z,y,x storage order: the predictor's kernels are mirrored instead
                    batch = np.zeros((batch_size, *grid.input_shape[::-1]), dtype=np.float32)
                    for i, index in enumerate(batch_idx):
                        sl = grid.input_box(index).slices(window.start)
                        np.multiply(data[sl[::-1]], factor, out=batch[i], casting="unsafe")
                    t = time.perf_counter()
                    predicted = predictor.predict(batch)
                    result.compute_seconds += time.perf_counter() - t
                    for i, index in enumerate(batch_idx):
                        out_box = grid.output_box(index)
                        target = grid.owned(index).intersect(block)
                        x_sl, y_sl, _ = target.slices(block.start)
                        slab_out[:, y_sl, x_sl] = predicted[i][target.slices(out_box.start)[::-1]]
                    done += len(batch_idx)
                    if progress:
                        progress(done, n_tiles)
                del data
            rows.flush(z1)

        if post_processing is not None:
            t = time.perf_counter()
            prob_xyz = rows.whole().transpose(2, 1, 0)  # a view: post-processing works in place
            post_process(
                prob_xyz,
                post_processing.high_threshold,
                post_processing.low_threshold,
                post_processing.small_region_probability_threshold,
                post_processing.small_region_size_threshold,
            )
            result.compute_seconds += time.perf_counter() - t
        rows.flush(block.end[2], final=True)
        rows.wait()
        result.write_seconds = rows.write_seconds
        result.seconds = time.perf_counter() - t_start
        mark_block_done(
            output_volume,
            block,
            fingerprint,
            {"block": [list(block.start), list(block.end)], "settings": settings, "seconds": result.seconds},
        )
        return result
    finally:
        prefetcher.shutdown(wait=True, cancel_futures=True)
        executor.shutdown(wait=True, cancel_futures=True)


def _file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()
