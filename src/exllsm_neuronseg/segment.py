"""Block-wise segmentation of a volume with the U-Net.

``segment_block`` predicts one block ``[start, end)`` of an input dataset into an output dataset.
Tiles sit on a global grid (see :mod:`.geometry`), so the result does not depend on how the
volume is cut into blocks.  Tiles stream in storage order (x fastest, z slowest): the
next tile's input is read while the current one is predicted, and every output chunk is encoded
and written by a thread pool as soon as it is complete, while prediction goes on.  Peak memory is
two tiles of input, the output chunks not yet complete or written, and the model's working set
for one tile.

Done markers, design.  A marker ``<dataset>/.exllsm-done/<x0>_<y0>_<z0>-<x1>_<y1>_<z1>.json``
vouches that the block's box of the output holds the result of the settings it records:

* It lives inside the output dataset and records the dataset's creation identity
  (:func:`.volume.creation_identity`, new on every create and replacement; for a dataset another
  tool made, its metadata file's digest and time: :func:`.volume.block_identity`).  A block notes the
  identity when it starts, checks it before every chunk it writes (so it never recreates chunks of
  a removed dataset) and after its last one, and writes its marker only if it is unchanged.  A
  marker counts only while the dataset at the path has the identity it records.
* Before its first chunk, a block that runs removes the markers of every block whose box overlaps
  its own (its own included), whatever their settings: those boxes will no longer hold only their
  result.  A block is done only if its own marker matches, so "whole volume with S1, part redone
  with S2, whole volume with S1 again" recomputes the whole volume.  (Keeping markers of the same
  settings would rely on results not depending on the cut, which per-block post-processing breaks.)
  Overlapping blocks must not run at the same time: blocks of one plan never overlap or share a
  chunk, and blocks not aligned to the chunk grid hold the output's unaligned lock
  (:func:`unaligned_lock`), one at a time.
* The settings key the input by its resolved location and identity
  (:func:`.volume.dataset_identity`), not by the path as typed, and the model by its checksum.

The bookkeeping is per block (a directory listing and a few small files) plus one read of the
dataset's attributes file per chunk written, never per voxel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import testhook
from .errors import GeometryError, InputValueError, OutputError
from .geometry import XYZ, Box, check_block, check_chunk_aligned, format_xyz
from .postprocess import check_thresholds, post_process
from .scaling import check_scaled_values, check_scaling_factor, intensity_histogram, scaling_factor_from_histogram
from .volume import (
    Volume,
    check_output_volume,
    block_identity,
    dataset_identity,
    io_executor,
    io_thread_count,
    lower_thread_priority,
    same_dataset,
    split_by_chunks,
    write_error_message,
)

if TYPE_CHECKING:  # pragma: no cover
    from .inference import Predictor

log = logging.getLogger(__name__)

DONE_DIR = ".exllsm-done"
CONSTANT_DIR = ".exllsm-constant"  # the model's answers to constant tiles (see Predictor.constant_output)


@dataclass(frozen=True)
class PostProcessing:
    """Hysteresis thresholds, then small-object removal (host defaults)."""

    high_threshold: float = 0.98
    low_threshold: float = 0.2
    small_region_probability_threshold: float = 0.9
    small_region_size_threshold: int = 1000

    def __post_init__(self) -> None:  # bad thresholds are refused when the settings are made
        check_thresholds(
            self.high_threshold,
            self.low_threshold,
            self.small_region_probability_threshold,
            self.small_region_size_threshold,
        )


BLOCK_POST_PROCESSING_WARNING = (
    "post-processing runs on this block alone: objects cut by the block's borders are judged by their part "
    "inside it (hysteresis seeds, object sizes), so the result depends on how the volume is cut into blocks"
)


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
    model_tiles: int = 0  # tiles the model ran on
    constant_tiles: int = 0  # tiles of one input value: the recorded answer
    background_tiles: int = 0  # tiles outside the mask: background

    @property
    def skipped_tiles(self) -> int:
        return self.constant_tiles + self.background_tiles

    @property
    def voxels(self) -> int:
        return self.block.size

    @property
    def mvox_per_s(self) -> float:
        return self.voxels / self.seconds / 1e6 if self.seconds > 0 else math.inf

    def summary(self) -> str:
        if self.skipped:
            return f"block {self.block}: already done (marker present), skipped"
        skipped = []
        if self.constant_tiles:
            skipped.append(f"{self.constant_tiles} constant")
        if self.background_tiles:
            skipped.append(f"{self.background_tiles} outside the mask")
        without = f" ({', '.join(skipped)}: no model)" if skipped else ""
        return (
            f"block {self.block}: {self.tiles} tiles{without} in {self.seconds:.1f} s, "
            f"{self.mvox_per_s:.2f} Mvox/s, scaling {self.scaling:.6g}"
        )


# --------------------------------------------------------------------------------------------
# Done markers: written after a block's data, so re-runs can skip finished blocks
# --------------------------------------------------------------------------------------------
# (the design is in the module docstring)


def block_key(block: Box) -> str:
    return f"{format_xyz(block.start).replace(',', '_')}-{format_xyz(block.end).replace(',', '_')}"


_MARKER_NAME = re.compile(r"(\d+)_(\d+)_(\d+)-(\d+)_(\d+)_(\d+)\.json(?:\.partial)?")


def marker_path(output: Volume, block: Box) -> Path:
    return output.path / DONE_DIR / f"{block_key(block)}.json"


def run_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def block_is_done(output: Volume, block: Box, fingerprint: str) -> bool:
    """Whether the block's own marker records these settings and the identity of the dataset now at
    the output's path."""
    try:
        marker = json.loads(marker_path(output, block).read_text())
    except (OSError, ValueError):
        return False
    identity = block_identity(output.path)
    return (
        isinstance(marker, dict)
        and marker.get("fingerprint") == fingerprint
        and identity is not None
        and marker.get("output_identity") == identity
    )


def check_output_identity(output: Volume, identity: str) -> None:
    """Raise :class:`OutputError` unless the dataset at the output's path still has ``identity``."""
    now = block_identity(output.path)
    if now != identity:
        what = "removed" if now is None else f"replaced (creation identity {now}, not {identity})"
        raise OutputError(
            f"the output dataset {output} was {what} while this block ran: the block is not marked done; "
            "run it again into the dataset now there"
        )


def mark_block_done(output: Volume, block: Box, fingerprint: str, identity: str, info: dict) -> None:
    """Write the block's marker, if the dataset at the output's path still has ``identity`` (the one
    the block started with): call it after the block's last chunk is written."""
    check_output_identity(output, identity)
    path = marker_path(output, block)
    tmp = path.with_name(path.name + ".partial")
    record = {"fingerprint": fingerprint, "output_identity": identity, **info}
    try:
        path.parent.mkdir(exist_ok=True)  # never its parents: a removed dataset is not recreated
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if not output.path.is_dir():
            check_output_identity(output, identity)
        raise OutputError(write_error_message(f"the done marker of block {block} in {output}", exc, output.path)) from exc


def invalidate_overlapping_markers(output: Volume, block: Box) -> list[Box]:
    """Remove the markers (and leftover partial ones) of every block whose box overlaps ``block``,
    its own included; returns the other blocks whose markers were removed."""
    folder = output.path / DONE_DIR
    try:
        names = os.listdir(folder)
    except OSError:  # no marker yet (or no dataset: the block's identity checks report that)
        return []
    others = []
    for name in names:
        match = _MARKER_NAME.fullmatch(name)
        if not match:
            continue
        v = tuple(int(g) for g in match.groups())
        box = Box(v[:3], v[3:])  # type: ignore[arg-type]
        if box.intersect(block).empty:
            continue
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise OutputError(write_error_message(f"the done markers of {output}", exc, output.path)) from exc
        if box != block and not name.endswith(".partial"):
            others.append(box)
    return sorted(others, key=lambda b: (b.start[::-1], b.end[::-1]))


UNALIGNED_LOCK = ".exllsm-unaligned.lock"


@contextmanager
def unaligned_lock(output: Volume) -> Iterator[None]:
    """Hold the output's unaligned lock (an exclusive ``flock`` on ``<dataset>/.exllsm-unaligned.lock``).

    A block not aligned to the chunk grid shares chunks with its neighbours, and two jobs writing one
    chunk at once would lose voxels; so such blocks of one output run one at a time: a second one
    raises :class:`OutputError` at once instead of waiting.  The kernel releases the lock when its
    holder ends, however it ends.  Aligned blocks never take it.
    """
    import fcntl

    path = output.path / UNALIGNED_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if not output.path.is_dir():
            raise OutputError(f"the output dataset {output} was removed: create it again with create_volume.py") from exc
        raise OutputError(write_error_message(f"the lock file of {output}", exc, output.path)) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"another job writing a block not aligned to the output chunks holds {path}: such blocks share "
                "chunks, so one output takes one of them at a time; run this block when that job has ended"
            ) from None
        except OSError as exc:
            raise OutputError(
                f"cannot lock {path} ({exc.strerror}): a block not aligned to the output chunks needs an exclusive "
                "file lock on its output, and this file system refused it; use a block aligned to the chunk grid"
            ) from exc
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Scaling from the block itself (the original's behaviour without -s)
# --------------------------------------------------------------------------------------------


def block_scaling_factor(volume: Volume, block: Box, context: XYZ, executor=None) -> float:
    """The factor of the block's read window (block plus model context, clipped to the image).

    Histograms are counted chunk by chunk (in parallel with an executor) and added up.
    """
    window = block.grow(context).intersect(volume.box)
    pieces = split_by_chunks(window, volume.chunks)

    def count(piece: Box) -> np.ndarray:
        return intensity_histogram(volume.read_zyx(piece))

    counts = sum(executor.map(count, pieces) if executor else map(count, pieces))
    return scaling_factor_from_histogram(counts).factor


# --------------------------------------------------------------------------------------------
# The block loop
# --------------------------------------------------------------------------------------------


class _OutputChunks:
    """Collects the block's output by output chunk and writes each chunk as soon as it is complete.

    Tiles own disjoint boxes of the block.  A chunk that one tile fills whole is written straight
    from the tile's result; a chunk that several tiles share is buffered until all its voxels have
    arrived.  With the default tiles (output strides 256 and 128) on 128^3 or 64^3 chunks every
    chunk comes from a single tile, so the block's output is never held in memory.  With
    ``keep_all`` (post-processing needs the whole block) everything is kept in one array and
    written by :meth:`write_all`.
    """

    def __init__(
        self, output: Volume, block: Box, dtype: np.dtype, executor, keep_all: bool, guard: Callable[[], None] | None = None
    ) -> None:
        self.output, self.block, self.dtype, self.executor = output, block, dtype, executor
        self.guard = guard  # called before every chunk write; raises to stop the block (a replaced output)
        self.whole = np.zeros(block.shape[::-1], dtype=dtype) if keep_all else None
        self.buffers: dict[XYZ, tuple[np.ndarray, int]] = {}  # chunk piece start -> (z,y,x data, voxels filled)
        self.pending: list[Future] = []
        self.write_seconds = 0.0

    def put(self, box: Box, data_zyx: np.ndarray) -> None:
        """Store the result for ``box`` (inside the block); write the chunks it completes."""
        if self.whole is not None:
            self.whole[box.slices(self.block.start)[::-1]] = data_zyx
            return
        for piece in split_by_chunks(box, self.output.chunks):
            chunk_piece = _chunk_piece(piece, self.output.chunks).intersect(self.block)
            part = data_zyx[piece.slices(box.start)[::-1]]
            if chunk_piece == piece:
                self._submit(piece.start, part)
                continue
            buffer, filled = self.buffers.get(chunk_piece.start, (None, 0))
            if buffer is None:
                buffer = np.empty(chunk_piece.shape[::-1], dtype=self.dtype)
            buffer[piece.slices(chunk_piece.start)[::-1]] = part
            filled += piece.size
            if filled == chunk_piece.size:
                self.buffers.pop(chunk_piece.start, None)
                self._submit(chunk_piece.start, buffer)
            else:
                self.buffers[chunk_piece.start] = (buffer, filled)
        self._collect()

    def write_all(self) -> None:
        """Write the whole block (``keep_all``)."""
        assert self.whole is not None
        for piece in split_by_chunks(self.block, self.output.chunks):
            self._submit(piece.start, self.whole[piece.slices(self.block.start)[::-1]])

    def _submit(self, start: XYZ, data_zyx: np.ndarray) -> None:
        self.pending.append(self.executor.submit(self._write, start, data_zyx))

    def _collect(self) -> None:
        running = []
        for f in self.pending:
            if f.done():
                f.result()  # a failed write stops the block now, before more work is done
            else:
                running.append(f)
        self.pending = running

    def _write(self, start: XYZ, data_zyx: np.ndarray) -> None:
        t = time.perf_counter()
        if self.guard is not None:
            self.guard()
        self.output.write_zyx(start, data_zyx)
        self.write_seconds += time.perf_counter() - t

    def wait(self) -> None:
        if self.buffers:  # pragma: no cover - tiles always cover the block
            raise GeometryError(f"{len(self.buffers)} output chunks were not completely predicted")
        for f in self.pending:
            f.result()
        self.pending.clear()


def _chunk_piece(box: Box, chunks: XYZ) -> Box:
    """The whole chunk that holds ``box`` (which lies inside one chunk)."""
    start = tuple(s // c * c for s, c in zip(box.start, chunks))
    return Box(start, tuple(s + c for s, c in zip(start, chunks)))  # type: ignore[arg-type]


def _resolve_predictor(
    model: "str | Path | Predictor",
    input_volume: Volume,
    input_shape: Sequence[int] | None,
    output_shape: Sequence[int] | None,
    binary: bool,
    precision: str,
) -> "Predictor":
    """The running model for a block: the one given (checked against the block's settings), or a new one."""
    from .inference import Predictor, cached_predictor

    if not isinstance(model, Predictor):
        return cached_predictor(model, input_shape, output_shape, input_volume.shape, binary=binary, axes="zyx", precision=precision)
    if model.axes != "zyx" or model.binary != binary or model.precision != precision:
        raise ValueError(
            f"the predictor was built for axes {model.axes}, binary {model.binary}, precision {model.precision}; "
            f"this block needs zyx, {binary}, {precision}"
        )
    if input_shape is not None and tuple(input_shape) != model.input_shape:
        raise GeometryError(f"tile shape {format_xyz(input_shape)} given to a predictor for {format_xyz(model.input_shape)} tiles")
    if output_shape is not None and tuple(output_shape) != model.output_shape:
        raise GeometryError(f"tile output shape {format_xyz(output_shape)} given to a predictor for {format_xyz(model.output_shape)}")
    return model


def _check_alignment(block: Box, output_volume: Volume, region: Box | None, allow_unaligned: bool) -> bool:
    """Whether the block is unaligned (allowed); raises :class:`GeometryError` if it is and that is not allowed."""
    try:
        check_chunk_aligned(block, output_volume.chunks, output_volume.shape, region)
        return False
    except GeometryError:
        if not allow_unaligned:
            raise
        return True


def segment_block(
    input_volume: Volume,
    output_volume: Volume,
    model: "str | Path | Predictor",
    start: Sequence[int],
    end: Sequence[int],
    scaling: float | None = None,
    input_shape: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    batch_size: int = 1,
    binary: bool = False,
    post_processing: PostProcessing | None = None,
    allow_unaligned: bool = False,
    region: Box | None = None,
    skip_done: bool = True,
    io_threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] = log.warning,
    skip_constant: bool = True,
    mask: Volume | None = None,
    precision: str = "fp32",
) -> SegmentationResult:
    """Segment ``[start, end)`` (x,y,z, end-exclusive) of ``input_volume`` into ``output_volume``.

    ``model`` is a model file or a :class:`.inference.Predictor` (built for z,y,x arrays; pass one
    to run several blocks with one model load, see :func:`segment_blocks`).

    Everything is validated before the first voxel is written: block inside the image, tile
    shapes valid for the model, output dims and dtype, chunk alignment (unless
    ``allow_unaligned``) and the scaling factor.  Alignment means no other block can share an
    output chunk with this one: start and end are on the chunk grid, or on the edge of ``region``
    (the processed region the block was clipped to; default the whole image), see
    :func:`.geometry.check_chunk_aligned`.  ``input_shape`` is the tile shape (x,y,z); it
    follows ``output_shape`` when only that is given, and defaults to
    :func:`.unet.default_tile_shape` of the image.  Tiles run one at a time (``batch_size`` is
    checked and kept for the original's flag).  ``progress(tiles_done, tiles_total)`` is called
    after every tile.

    ``skip_constant``: a tile whose whole input (context included) is one value gets the model's
    answer to that value (:meth:`.inference.Predictor.constant_output`, recorded beside the output
    in ``<dataset>/.exllsm-constant``) without running the model; equal to running it up to float
    rounding.  ``mask`` (a volume of any shape, nonzero = tissue, scaled to the image): a tile whose
    owned box holds no tissue is written as background (0) without the model; not exact, so off
    unless given.  ``precision``: ``fp32``, ``bf16`` or ``fp16`` (:mod:`.inference`).

    Done markers (see the module docstring): a block whose own marker matches
    its settings and the output's creation identity is skipped (unless ``skip_done`` is false);
    otherwise the markers of every block overlapping it are removed before its first chunk, the
    output's identity is checked before each chunk write and after the last, and the marker is
    written only if it is unchanged (else :class:`OutputError`).  A block that is not aligned runs
    under the output's unaligned lock (:func:`unaligned_lock`).
    """
    t_start = time.perf_counter()
    predictor = _resolve_predictor(model, input_volume, input_shape, output_shape, binary, precision)
    grid = predictor.grid
    block = check_block(tuple(start), tuple(end), input_volume.shape)  # type: ignore[arg-type]
    if same_dataset(input_volume.container, input_volume.dataset, output_volume.container, output_volume.dataset):
        raise OutputError(f"the output {output_volume} is the input dataset itself: segment into another dataset")
    check_output_volume(output_volume, input_volume.shape, binary)
    output_identity = _output_identity(output_volume, warn)
    unaligned = _check_alignment(block, output_volume, region, allow_unaligned)
    if batch_size < 1:
        raise GeometryError(f"batch size {batch_size} must be >= 1")
    if scaling is not None:
        check_scaling_factor(scaling, input_volume.dtype)  # refused before anything is read
    if mask is not None:
        check_mask(mask)
    io_threads = io_thread_count(io_threads, warn)
    if post_processing is not None and block != (region if region is not None else input_volume.box):
        warn(BLOCK_POST_PROCESSING_WARNING)

    executor = io_executor(io_threads, background=True)  # chunk decoding and encoding
    # Reading a tile waits on chunk tasks in ``executor``; it runs in its own thread so it can never
    # occupy the pool it waits on (with one I/O thread that would deadlock).
    prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-prefetch", initializer=lower_thread_priority)
    held = ExitStack()  # the unaligned lock, for the rest of the run
    try:
        if scaling is None:
            warn(
                "no scaling factor given (-s): computing one from this block alone; blocks then get "
                "different factors and the result shows seams between blocks. Pass a global -s."
            )
            scaling = block_scaling_factor(input_volume, block, grid.context, executor)
        scaling = check_scaling_factor(scaling, input_volume.dtype)
        settings = {
            "model_sha256": predictor.fingerprint,
            "scaling": repr(float(scaling)),
            "input": dataset_identity(input_volume),  # resolved location and identity, not the path as typed
            "tile": grid.input_shape,
            "binary": binary,
            "post_processing": asdict(post_processing) if post_processing else None,
        }
        # settings added later appear only when not at their default, so older markers stay valid
        if predictor.precision != "fp32":
            settings["precision"] = predictor.precision
        if mask is not None:
            settings["mask"] = dataset_identity(mask)
        fingerprint = run_fingerprint(settings)
        n_tiles = grid.count(block)
        if skip_done and block_is_done(output_volume, block, fingerprint):
            return SegmentationResult(block, n_tiles, time.perf_counter() - t_start, scaling, skipped=True)
        if unaligned:
            held.enter_context(unaligned_lock(output_volume))
        check_output_identity(output_volume, output_identity)
        overlapped = invalidate_overlapping_markers(output_volume, block)
        if overlapped:
            shown = ", ".join(map(str, overlapped[:3])) + (f" and {len(overlapped) - 3} more" if len(overlapped) > 3 else "")
            warn(
                f"this block overlaps {len(overlapped)} finished block(s) ({shown}): their done markers are "
                "removed, so they are segmented again when they next run"
            )
        testhook.checkpoint("block:started")

        window = block.grow(grid.context)  # the input the block's voxels depend on (reflected beyond the image)

        def read_tile(index: tuple[int, int, int]) -> tuple[np.ndarray | None, str, float]:
            """One tile's input in z,y,x storage order and raw dtype (read one tile ahead), and how
            it is to be computed: ``model``, ``constant`` (the tile is one value: a 1-voxel array of
            it is returned) or ``background`` (outside the mask: nothing is read).

            Float input: the part of the tile inside the block's window must be finite and stay
            finite when scaled (one min and one max; integer input is not looked at)."""
            t = time.perf_counter()
            if mask is not None and not mask_has_tissue(mask, grid.owned(index).intersect(input_volume.box), input_volume.shape):
                return None, "background", time.perf_counter() - t
            box = grid.input_box(index)
            tile = input_volume.read_reflect_zyx(box, executor)
            if tile.dtype.kind == "f" and not check_scaled_values(tile[box.intersect(window).slices(box.start)[::-1]], scaling):
                input_volume.check_finite(window.intersect(input_volume.box), executor)  # raises: how many, the first
                raise InputValueError(f"{input_volume} holds NaN or infinite voxels near {box}")  # pragma: no cover
            if skip_constant and _is_constant(tile):
                return tile.reshape(-1)[:1].copy(), "constant", time.perf_counter() - t
            return tile, "model", time.perf_counter() - t

        rx, ry, rz = grid.tile_indices(block)
        order = [(kx, ky, kz) for kz in rz for ky in ry for kx in rx]  # storage order: x fastest
        next_tile = prefetcher.submit(read_tile, order[0])
        result = SegmentationResult(block, n_tiles, 0.0, scaling)
        out_dtype = np.dtype(np.uint8) if binary else np.dtype(np.float32)
        out_shape_zyx = grid.output_shape[::-1]
        records = output_volume.path / CONSTANT_DIR
        # temporary files of this block's chunk writes that a killed run left (its own chunks only)
        output_volume.remove_partial_chunk_files(block, whole_chunks_only=allow_unaligned)
        results = _OutputChunks(
            output_volume,
            block,
            out_dtype,
            executor,
            keep_all=post_processing is not None,
            guard=lambda: check_output_identity(output_volume, output_identity),
        )
        factor = float(np.float32(scaling))
        for done, index in enumerate(order, start=1):
            tile, how, read_s = next_tile.result()
            result.read_seconds += read_s
            if done < len(order):
                next_tile = prefetcher.submit(read_tile, order[done])
            # the engine mirrors its kernels for z,y,x and scales in float32 on the way in
            t = time.perf_counter()
            if how == "model":
                predicted = predictor.predict(tile, factor)
                result.flops += predictor.flops_per_tile()
                result.model_tiles += 1
            elif how == "constant":
                predicted = predictor.constant_output(tile[0], tile.dtype, factor, records)
                result.constant_tiles += 1
            else:
                predicted = np.broadcast_to(np.zeros((), out_dtype), out_shape_zyx)
                result.background_tiles += 1
            result.compute_seconds += time.perf_counter() - t
            del tile
            target = grid.owned(index).intersect(block)
            results.put(target, predicted[target.slices(grid.output_box(index).start)[::-1]])
            if progress:
                progress(done, n_tiles)

        if post_processing is not None:
            t = time.perf_counter()
            prob_xyz = results.whole.transpose(2, 1, 0)  # a view: post-processing works in place
            post_process(
                prob_xyz,
                post_processing.high_threshold,
                post_processing.low_threshold,
                post_processing.small_region_probability_threshold,
                post_processing.small_region_size_threshold,
            )
            result.compute_seconds += time.perf_counter() - t
            results.write_all()
        results.wait()
        testhook.checkpoint("block:chunks-written")
        result.write_seconds = results.write_seconds
        result.seconds = time.perf_counter() - t_start
        mark_block_done(
            output_volume,
            block,
            fingerprint,
            output_identity,
            {
                "block": [list(block.start), list(block.end)],
                "settings": settings,
                "model_name": predictor.path.name,
                "seconds": result.seconds,
            },
        )
        return result
    finally:
        prefetcher.shutdown(wait=True, cancel_futures=True)
        executor.shutdown(wait=True, cancel_futures=True)
        held.close()


def _is_constant(tile: np.ndarray) -> bool:
    """Whether every voxel of the tile has one value (one min and one max over the tile)."""
    flat = tile.reshape(-1)
    first = flat[0]
    return bool(flat.min() == first and flat.max() == first)


# --------------------------------------------------------------------------------------------
# Masks: where the tissue is
# --------------------------------------------------------------------------------------------


def check_mask(mask: Volume) -> None:
    if len(mask.shape) != 3 or min(mask.shape) < 1:
        raise GeometryError(f"the mask {mask} has shape {mask.shape}: a mask is a 3-D dataset")


def mask_box(box: Box, mask_shape: XYZ, image_shape: XYZ) -> Box:
    """The mask voxels covering image ``box``: the mask is stretched over the image, axis by axis
    (mask voxel ``m`` covers image voxels ``[m*n/k, (m+1)*n/k)`` for an image edge n and mask edge k)."""
    start = tuple(s * k // n for s, k, n in zip(box.start, mask_shape, image_shape))
    end = tuple(max(-(-e * k // n), a + 1) for e, k, n, a in zip(box.end, mask_shape, image_shape, start))
    return Box(start, tuple(min(e, k) for e, k in zip(end, mask_shape)))  # type: ignore[arg-type]


def mask_has_tissue(mask: Volume, box: Box, image_shape: XYZ) -> bool:
    """Whether any mask voxel covering image ``box`` is nonzero."""
    return bool(np.any(mask.read_zyx(mask_box(box, mask.shape, image_shape))))


# --------------------------------------------------------------------------------------------
# Many blocks in one process
# --------------------------------------------------------------------------------------------


def segment_blocks(
    input_volume: Volume,
    output_volume: Volume,
    model_path: "str | Path | Predictor",
    blocks: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    input_shape: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    binary: bool = False,
    precision: str = "fp32",
    allow_unaligned: bool = False,
    region: Box | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_result: Callable[[SegmentationResult], None] | None = None,
    **options,
) -> list[SegmentationResult]:
    """Segment several blocks ``(start, end)`` with one model load: each block as
    :func:`segment_block` does it (its own done marker and result; ``options`` are its keyword
    arguments), the model read and its tile shapes checked once, TensorFlow started once (and not at
    all when every block is done, or all its tiles are constant with recorded answers).

    Every block is checked (inside the image, aligned, not overlapping another of the list) before
    the first one starts.  ``progress(tiles_done, tiles_total)`` counts tiles over all blocks;
    ``on_result`` is called after each block.
    """
    if not blocks:
        raise GeometryError("no blocks given")
    predictor = _resolve_predictor(model_path, input_volume, input_shape, output_shape, binary, precision)
    boxes = [check_block(tuple(s), tuple(e), input_volume.shape) for s, e in blocks]  # type: ignore[arg-type]
    check_output_volume(output_volume, input_volume.shape, binary)
    for box in boxes:
        _check_alignment(box, output_volume, region, allow_unaligned)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if not a.intersect(b).empty:
                raise GeometryError(f"blocks {a} and {b} overlap: the blocks of one run must be disjoint")
    totals = [predictor.grid.count(b) for b in boxes]
    before = 0
    results = []
    for box, n in zip(boxes, totals):
        step = None
        if progress is not None:
            step = lambda done, _n, before=before: progress(before + done, sum(totals))  # noqa: E731
        result = segment_block(
            input_volume,
            output_volume,
            predictor,
            box.start,
            box.end,
            binary=binary,
            precision=precision,
            allow_unaligned=allow_unaligned,
            region=region,
            progress=step,
            **options,
        )
        before += n
        if progress is not None and result.skipped:
            progress(before, sum(totals))
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _output_identity(output: Volume, warn: Callable[[str], None]) -> str:
    """The identity a block checks its output against (:func:`.volume.block_identity`): the creation
    identity, or for a dataset another tool made (no creation identity) its metadata, with a warning
    that only a rewrite of the metadata can then tell a replacement."""
    identity = block_identity(output.path)
    if identity is None:
        raise OutputError(f"the output dataset {output} no longer exists: create it again with create_volume.py")
    if identity.startswith("metadata-"):
        warn(
            f"the output dataset {output} has no creation identity (another tool or an older version made it): "
            "a replacement is recognised by its metadata file only; create_volume.py on it adds one and keeps its data"
        )
    return identity
