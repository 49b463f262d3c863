"""Block and tile geometry.  Every coordinate here is x,y,z and every box is end-exclusive.

Words used throughout the package:

* **region**: the part of the volume a run processes (the host's ``partial_volume``, or all of it);
* **block**: the part of a volume one job segments, ``[start, end)``;
* **tile**: one forward pass of the U-Net; its *output box* is what it predicts and its *input
  box* is the output box grown by the model's *context* (margin) on every side;
* **chunk**: the storage unit of an N5/zarr dataset (N5 calls it ``blockSize``).

Tiles sit on a *global* grid: tile output origins are multiples of the tile stride, which is the
tile output edge rounded down to a multiple of the model's grid (2**(n_blocks+1), 8 for the
published model).  Each voxel therefore is predicted by the same tile whatever block asks for it,
so block-wise results are bit-identical to whole-volume results.

Blocks sit on a grid too (:func:`plan_blocks`): cells of the partition size, a whole number of
chunks, clipped to the region, so parallel blocks never write the same chunk.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .errors import GeometryError

log = logging.getLogger(__name__)

XYZ = tuple[int, int, int]


def parse_xyz(text: str | int | Sequence[int], name: str = "value", minimum: int | None = None) -> XYZ:
    """Parse ``"x,y,z"`` (or a 3-sequence; one number means the same on every axis) into three ints."""
    if isinstance(text, int):
        values: tuple[int, ...] = (text, text, text)
    elif isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) == 1 and parts[0]:
            parts = parts * 3
        try:
            values = tuple(int(p) for p in parts)
        except ValueError as exc:
            raise GeometryError(f"{name} {text!r} is not 'x,y,z' with integer values") from exc
    else:
        values = tuple(int(v) for v in text)
    if len(values) != 3:
        raise GeometryError(f"{name} {text!r} must have 3 values x,y,z, got {len(values)}")
    if minimum is not None and any(v < minimum for v in values):
        raise GeometryError(f"{name} {format_xyz(values)} must have every value >= {minimum}")
    return values  # type: ignore[return-value]


def format_xyz(values: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in values)


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``[start, end)`` in x,y,z voxel coordinates."""

    start: XYZ
    end: XYZ

    @property
    def shape(self) -> XYZ:
        return tuple(e - s for s, e in zip(self.start, self.end))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def empty(self) -> bool:
        return any(e <= s for s, e in zip(self.start, self.end))

    def intersect(self, other: Box) -> Box:
        return Box(
            tuple(max(a, b) for a, b in zip(self.start, other.start)),  # type: ignore[arg-type]
            tuple(min(a, b) for a, b in zip(self.end, other.end)),  # type: ignore[arg-type]
        )

    def grow(self, amount: Sequence[int]) -> Box:
        return Box(
            tuple(s - m for s, m in zip(self.start, amount)),  # type: ignore[arg-type]
            tuple(e + m for e, m in zip(self.end, amount)),  # type: ignore[arg-type]
        )

    def contains(self, other: Box) -> bool:
        return all(a <= b for a, b in zip(self.start, other.start)) and all(
            a >= b for a, b in zip(self.end, other.end)
        )

    def slices(self, origin: Sequence[int] = (0, 0, 0)) -> tuple[slice, slice, slice]:
        """Slices of this box in an x,y,z array whose element [0,0,0] is at ``origin``."""
        return tuple(slice(s - o, e - o) for s, e, o in zip(self.start, self.end, origin))  # type: ignore

    def __str__(self) -> str:
        return f"[{format_xyz(self.start)} .. {format_xyz(self.end)})"


def check_block(start: XYZ, end: XYZ, image_shape: XYZ) -> Box:
    """Validate a block against the image: ``0 <= start < end <= image_shape`` on every axis."""
    for axis, s, e, n in zip("xyz", start, end, image_shape):
        if s >= e:
            raise GeometryError(
                f"block start {format_xyz(start)} must be < end {format_xyz(end)} on every axis ({axis}: {s} >= {e})"
            )
        if s < 0 or e > n:
            raise GeometryError(
                f"block {format_xyz(start)}..{format_xyz(end)} lies outside the image "
                f"0,0,0..{format_xyz(image_shape)} on axis {axis} (allowed 0 <= start < end <= {n})"
            )
    return Box(start, end)


def check_chunk_aligned(box: Box, chunks: XYZ, image_shape: XYZ, region: Box | None = None) -> None:
    """Raise unless no other block of the ``region`` can write a chunk that ``box`` writes.

    That holds when ``box`` lies in the region and, per axis, its start is on the chunk grid or is
    the region's start, and its end is on the chunk grid or is the region's end: a chunk the region
    cuts belongs to the one block at that edge.  ``region`` defaults to the whole image (ends may
    then stop at the image edge).  The block planner's blocks all pass this check.
    """
    region = region if region is not None else Box((0, 0, 0), tuple(image_shape))  # type: ignore[arg-type]
    if not region.contains(box):
        raise GeometryError(f"block {box} does not lie in the processed region {region}")
    whole = region == Box((0, 0, 0), tuple(image_shape))  # type: ignore[arg-type]
    for axis, s, e, c, r0, r1 in zip("xyz", box.start, box.end, chunks, region.start, region.end):
        if (s % c and s != r0) or (e % c and e != r1):
            edge = f"image edge {r1}" if whole else f"region edges {r0} and {r1}"
            raise GeometryError(
                f"block {box} is not aligned to the output chunk grid {format_xyz(chunks)} on axis {axis}: "
                f"start and end must be multiples of {c} (or the {edge}); parallel blocks sharing a "
                "chunk would overwrite each other's voxels. Use aligned blocks, or allow unaligned blocks for a lone run"
            )


@dataclass(frozen=True)
class TileGrid:
    """The global tile grid for a model's tile shapes."""

    input_shape: XYZ
    output_shape: XYZ
    grid: int = 8

    def __post_init__(self) -> None:
        for i, o in zip(self.input_shape, self.output_shape):
            if (i - o) % 2:
                raise GeometryError(f"tile input {self.input_shape} and output {self.output_shape} differ by an odd amount")
            if o < self.grid:
                raise GeometryError(f"tile output edge {o} is smaller than the model grid {self.grid}")

    @property
    def context(self) -> XYZ:
        """Voxels of input the model needs on each side of its output."""
        return tuple((i - o) // 2 for i, o in zip(self.input_shape, self.output_shape))  # type: ignore

    @property
    def stride(self) -> XYZ:
        """Distance between tile origins: the output edge rounded down to the model grid."""
        return tuple(o // self.grid * self.grid for o in self.output_shape)  # type: ignore

    def tile_indices(self, box: Box) -> list[range]:
        """Per axis, the range of tile indices whose owned region meets ``box``."""
        return [range(s // st, -(-e // st)) for s, e, st in zip(box.start, box.end, self.stride)]

    def owned(self, index: Sequence[int]) -> Box:
        """The region a tile writes: ``[k*stride, (k+1)*stride)`` per axis."""
        start = tuple(k * st for k, st in zip(index, self.stride))
        return Box(start, tuple(s + st for s, st in zip(start, self.stride)))  # type: ignore[arg-type]

    def output_box(self, index: Sequence[int]) -> Box:
        start = tuple(k * st for k, st in zip(index, self.stride))
        return Box(start, tuple(s + o for s, o in zip(start, self.output_shape)))  # type: ignore[arg-type]

    def input_box(self, index: Sequence[int]) -> Box:
        return self.output_box(index).grow(self.context)

    def tiles(self, box: Box) -> Iterator[tuple[int, int, int]]:
        """Tile indices covering ``box``, z slowest then y then x (storage order of N5)."""
        rx, ry, rz = self.tile_indices(box)
        for kz, ky, kx in itertools.product(rz, ry, rx):
            yield (kx, ky, kz)

    def count(self, box: Box) -> int:
        return math.prod(len(r) for r in self.tile_indices(box))


def block_line(box: Box) -> str:
    """A block as one line of a block plan file: ``x0,y0,z0,x1,y1,z1`` (end-exclusive)."""
    return format_xyz(box.start + box.end)


def parse_block_line(line: str, where: str = "block") -> Box:
    """The block of one plan line ``x0,y0,z0,x1,y1,z1`` (anything after the first blank is ignored)."""
    text = line.strip().split()[0] if line.strip() else ""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 6:
        raise GeometryError(f"{where}: {line.strip()!r} is not a block 'x0,y0,z0,x1,y1,z1'")
    return Box(tuple(values[:3]), tuple(values[3:]))  # type: ignore[arg-type]


def read_block_plan(text: str, source: str = "block plan") -> list[Box]:
    """The blocks of a plan file's text (``plan_blocks.py -o``): one ``x0,y0,z0,x1,y1,z1`` per
    non-empty line, in order."""
    return [parse_block_line(line, f"{source} line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def select_indices(spec: str, count: int, what: str = "block") -> list[int]:
    """Indices from ``"0,3-5,9"`` (0-based, ranges inclusive), each in ``[0, count)``, in the order
    given, without repeats; ``""`` or ``"all"`` selects all."""
    text = spec.strip()
    if text in ("", "all"):
        return list(range(count))
    chosen: list[int] = []
    for part in text.split(","):
        piece = part.strip()
        a, dash, b = piece.partition("-")
        try:
            lo, hi = (int(a), int(b)) if dash else (int(piece), int(piece))
        except ValueError:
            raise GeometryError(f"{what} index {piece!r} in {spec!r} is not a number or a range a-b") from None
        if lo > hi:
            raise GeometryError(f"{what} index range {piece!r} runs backwards")
        for i in range(lo, hi + 1):
            if not 0 <= i < count:
                raise GeometryError(f"{what} index {i} is out of range: the plan has {count} {what}s (0..{count - 1})")
            if i not in chosen:
                chosen.append(i)
    return chosen


def processed_region(partial_volume: str | Sequence[int] | None, image_shape: XYZ) -> Box:
    """The region a run processes, from the host's ``partial_volume`` ``"x0,y0,z0,dx,dy,dz"``.

    That is a start and a size (not an end).  The start must lie inside the image; the size is
    clipped to the image.  ``None`` or an empty string means the whole image.
    """
    image = Box((0, 0, 0), tuple(int(n) for n in image_shape))  # type: ignore[arg-type]
    if partial_volume is None or (isinstance(partial_volume, str) and not partial_volume.strip()):
        return image
    text = partial_volume if isinstance(partial_volume, str) else format_xyz(partial_volume)
    try:
        values = [int(p) for p in text.split(",")]
    except ValueError as exc:
        raise GeometryError(f"partial volume {text!r} is not 'x0,y0,z0,dx,dy,dz' with integer values") from exc
    if len(values) != 6:
        raise GeometryError(
            f"partial volume {text!r} must have 6 values x0,y0,z0,dx,dy,dz (start and size), got {len(values)}"
        )
    start, size = tuple(values[:3]), tuple(values[3:])
    for axis, s, d, n in zip("xyz", start, size, image.end):
        if not 0 <= s < n:
            raise GeometryError(
                f"partial volume {text} starts at {format_xyz(start)}, outside the image {format_xyz(image.end)} "
                f"on axis {axis} (allowed 0 <= {axis}0 < {n})"
            )
        if d < 1:
            raise GeometryError(f"partial volume {text} has size {format_xyz(size)}: every size must be >= 1")
    return Box(start, tuple(min(s + d, n) for s, d, n in zip(start, size, image.end)))  # type: ignore[arg-type]


def _axis_cuts(start: int, end: int, step: int, anchor: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut at ``anchor + k*step``: the grid cells that meet it, clipped to it."""
    first = anchor + (start - anchor) // step * step
    return [(max(c, start), min(c + step, end)) for c in range(first, end, step)]


def grid_cells(region: Box, cell: XYZ, anchor: Sequence[int] = (0, 0, 0)) -> list[Box]:
    """The cells ``anchor + k*cell`` (per axis) that meet ``region``, clipped to it.

    Ordered x fastest, then y, then z (the host pipeline's order of blocks and jobs).  The cells
    tile the region exactly: every voxel lies in one of them.
    """
    ax, ay, az = (_axis_cuts(s, e, c, a) for s, e, c, a in zip(region.start, region.end, cell, anchor))
    return [Box((x0, y0, z0), (x1, y1, z1)) for z0, z1 in az for y0, y1 in ay for x0, x1 in ax]


def grid_count(region: Box, cell: XYZ, anchor: Sequence[int] = (0, 0, 0)) -> int:
    """How many cells :func:`grid_cells` gives, without listing them."""
    return math.prod(len(_axis_cuts(s, e, c, a)) for s, e, c, a in zip(region.start, region.end, cell, anchor))


def rectangular_tiles(start: XYZ, end: XYZ, size: XYZ) -> list[Box]:
    """The scaling-factor tiling: origins ``start + k*size``, edge tiles truncated at ``end``.

    Ordered with z fastest (C order over x,y,z), like the original ``RectangularTiling``.
    """
    ax, ay, az = (_axis_cuts(s, e, p, s) for s, e, p in zip(start, end, size))
    return [Box((x0, y0, z0), (x1, y1, z1)) for x0, x1 in ax for y0, y1 in ay for z0, z1 in az]


@dataclass(frozen=True)
class BlockPlan:
    """The blocks of one run: one job each."""

    region: Box
    chunks: XYZ
    partition_size: XYZ  # the block edge, a whole number of chunks per axis
    blocks: tuple[Box, ...]


def plan_blocks(
    image_shape: Sequence[int],
    chunks: Sequence[int],
    partition_size: str | int | Sequence[int],
    partial_volume: str | Sequence[int] | None = None,
) -> BlockPlan:
    """Cut the processed region into blocks that parallel jobs can write without sharing a chunk.

    ``partition_size`` (x,y,z, or one number) is rounded up to a multiple of ``chunks`` per axis,
    with a warning.  ``partial_volume`` is the host's ``"x0,y0,z0,dx,dy,dz"`` (see
    :func:`processed_region`) and may start and end anywhere.  Blocks are the cells of a grid of
    the partition size anchored at the chunk boundary at or before the region's start, clipped to
    the region, x fastest, then y, then z.  Every cell is a union of whole chunks, so a block
    boundary inside the region is on the chunk grid, and a chunk the region's edge cuts is written
    by one block only.  When the region starts on the chunk grid (always, without a partial volume)
    these are the host pipeline's blocks: ``start = region start + k * partition size``.
    """
    shape = parse_xyz(image_shape, "image shape", minimum=1)
    chunk = parse_xyz(chunks, "chunk size", minimum=1)
    asked = parse_xyz(partition_size, "partition size", minimum=1)
    partition = tuple(-(-p // c) * c for p, c in zip(asked, chunk))
    if partition != asked:
        log.warning(
            "partition size %s is not a multiple of the chunk size %s: using %s (rounded up) so that no two "
            "blocks share a chunk",
            format_xyz(asked),
            format_xyz(chunk),
            format_xyz(partition),
        )
    region = processed_region(partial_volume, shape)
    anchor = tuple(s // c * c for s, c in zip(region.start, chunk))
    blocks = grid_cells(region, partition, anchor)  # type: ignore[arg-type]
    return BlockPlan(region, chunk, partition, tuple(blocks))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ScalingPlan:
    """The scaling-factor sampling jobs of one run; none when sampling is off."""

    region: Box
    fraction: float  # the fraction of its tiles each job samples (scaling_factor.py -p); 0 when off
    n_tiles: int  # sampling tiles in the region
    job_edge: int  # edge of a job's cube; 0 when off
    jobs: tuple[Box, ...]

    @property
    def active(self) -> bool:
        return bool(self.jobs)


def plan_scaling(
    image_shape: Sequence[int],
    tiles: int = 0,
    fraction: float = 0.0,
    tile_size: str | int | Sequence[int] = (396, 396, 396),
    max_tiles_per_job: int = 40,
    partial_volume: str | Sequence[int] | None = None,
) -> ScalingPlan:
    """The host pipeline's scaling-factor jobs (its ``neuron_scaling_factor`` arithmetic).

    Sampling is on only if ``tiles > 0`` or ``0 < fraction < 1``.  The region holds ``n_tiles``
    sampling tiles of ``tile_size`` (ceil per axis); each job samples the fraction
    ``tiles / n_tiles`` (or ``fraction`` when no tile count is given) of its own tiles.  Jobs are
    cubes of edge ``int(min(tile_size) * cbrt(max_tiles_per_job / fraction))``, so each samples about
    ``max_tiles_per_job`` tiles, from the region's start, clipped to it, x fastest.
    """
    shape = parse_xyz(image_shape, "image shape", minimum=1)
    tile = parse_xyz(tile_size, "scaling tile size", minimum=1)
    if max_tiles_per_job < 1:
        raise GeometryError(f"max scaling tiles per job {max_tiles_per_job} must be >= 1")
    region = processed_region(partial_volume, shape)
    n_tiles = grid_count(region, tile, region.start)
    if not (tiles > 0 or 0 < fraction < 1):
        return ScalingPlan(region, 0.0, n_tiles, 0, ())
    pct = tiles / n_tiles if tiles > 0 else float(fraction)
    edge = max(1, int(min(tile) * math.cbrt(max_tiles_per_job / pct)))
    jobs = grid_cells(region, (edge, edge, edge), region.start)
    return ScalingPlan(region, pct, n_tiles, edge, tuple(jobs))


def reflect_index(index, n: int):
    """Map integer coordinates onto ``[0, n)`` with numpy ``np.pad(mode='reflect')`` semantics.

    The edge voxel is not repeated (x[-k] = x[k]); long pads reflect again and again.
    """
    import numpy as np

    index = np.asarray(index)
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    r = np.mod(index, period)
    return np.where(r >= n, period - r, r)
