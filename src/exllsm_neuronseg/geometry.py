"""Block and tile geometry.  Every coordinate here is x,y,z and every box is end-exclusive.

Words used throughout the package:

* **block**: the part of a volume one job segments, ``[start, end)``;
* **tile**: one forward pass of the U-Net; its *output box* is what it predicts and its *input
  box* is the output box grown by the model's *context* (margin) on every side;
* **chunk**: the storage unit of an N5/zarr dataset (N5 calls it ``blockSize``).

Tiles sit on a *global* grid: tile output origins are multiples of the tile stride, which is the
tile output edge rounded down to a multiple of the model's grid (2**(n_blocks+1), 8 for the
published model).  Each voxel therefore is predicted by the same tile whatever block asks for it,
so block-wise results are bit-identical to whole-volume results.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

from .errors import GeometryError

XYZ = tuple[int, int, int]


def parse_xyz(text: str | Sequence[int], name: str = "value", minimum: int | None = None) -> XYZ:
    """Parse ``"x,y,z"`` (or a 3-sequence) into a tuple of three ints."""
    if isinstance(text, str):
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

    def intersect(self, other: "Box") -> "Box":
        return Box(
            tuple(max(a, b) for a, b in zip(self.start, other.start)),  # type: ignore[arg-type]
            tuple(min(a, b) for a, b in zip(self.end, other.end)),  # type: ignore[arg-type]
        )

    def grow(self, amount: Sequence[int]) -> "Box":
        return Box(
            tuple(s - m for s, m in zip(self.start, amount)),  # type: ignore[arg-type]
            tuple(e + m for e, m in zip(self.end, amount)),  # type: ignore[arg-type]
        )

    def contains(self, other: "Box") -> bool:
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


def check_chunk_aligned(box: Box, chunks: XYZ, image_shape: XYZ) -> None:
    """Raise unless ``box`` starts on the chunk grid and ends on it (or at the image end)."""
    for axis, s, e, c, n in zip("xyz", box.start, box.end, chunks, image_shape):
        if s % c or (e % c and e != n):
            raise GeometryError(
                f"block {box} is not aligned to the output chunk grid {format_xyz(chunks)} on axis {axis}: "
                f"start and end must be multiples of {c} (or end = image edge {n}); parallel blocks sharing a "
                "chunk would overwrite each other's voxels. Use aligned blocks, or --allow-unaligned for a lone run"
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


def rectangular_tiles(start: XYZ, end: XYZ, size: XYZ) -> list[Box]:
    """The scaling-factor tiling: origins ``start + k*size``, edge tiles truncated at ``end``.

    Ordered with z fastest (C order over x,y,z), like the original ``RectangularTiling``.
    """
    axes = [range(s, e, p) for s, e, p in zip(start, end, size)]
    return [
        Box((x, y, z), (min(x + size[0], end[0]), min(y + size[1], end[1]), min(z + size[2], end[2])))
        for x, y, z in itertools.product(*axes)
    ]


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
