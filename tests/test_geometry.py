"""Block and tile geometry (pure arithmetic, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from exllsm_neuronseg.errors import GeometryError
from exllsm_neuronseg.geometry import (
    Box,
    TileGrid,
    check_block,
    check_chunk_aligned,
    parse_xyz,
    rectangular_tiles,
    reflect_index,
)


def test_parse_xyz():
    assert parse_xyz("1,2,3") == (1, 2, 3)
    assert parse_xyz("512") == (512, 512, 512)
    assert parse_xyz([4, 5, 6]) == (4, 5, 6)
    for bad in ("1,2", "a,b,c", "1,2,3,4", ""):
        with pytest.raises(GeometryError):
            parse_xyz(bad, "--start")
    with pytest.raises(GeometryError, match=">= 1"):
        parse_xyz("0,1,1", "--chunks", minimum=1)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 45, 50])
@pytest.mark.parametrize("pad", [(0, 0), (3, 1), (44, 44), (60, 5)])
def test_reflect_index_is_numpy_reflect(n, pad):
    x = np.arange(n) * 10
    expected = np.pad(x, pad, mode="reflect") if n > 1 else np.pad(x, pad, mode="edge")
    idx = reflect_index(np.arange(-pad[0], n + pad[1]), n)
    np.testing.assert_array_equal(x[idx], expected)


def test_tile_grid_owned_regions_partition_space():
    grid = TileGrid((220, 220, 220), (132, 132, 132), 8)
    assert grid.stride == (128, 128, 128) and grid.context == (44, 44, 44)
    box = Box((5, 130, 0), (300, 260, 77))
    covered = np.zeros(box.shape, dtype=int)
    for index in grid.tiles(box):
        owned = grid.owned(index)
        assert all(s % 8 == 0 for s in owned.start)  # global grid: origins on multiples of 8
        assert grid.output_box(index).contains(owned)
        part = owned.intersect(box)
        covered[part.slices(box.start)] += 1
    assert (covered == 1).all()
    assert grid.count(box) == 3 * 2 * 1


def test_tile_grid_is_anchored_globally():
    """The tile that predicts a voxel does not depend on the block that asks for it."""
    grid = TileGrid((132, 132, 220), (44, 44, 132), 8)
    assert grid.stride == (40, 40, 128)
    a = {grid.owned(i) for i in grid.tiles(Box((0, 0, 0), (100, 100, 100)))}
    b = {grid.owned(i) for i in grid.tiles(Box((41, 3, 17), (59, 81, 99)))}
    assert b <= a


def test_check_block():
    assert check_block((0, 0, 0), (10, 10, 10), (10, 10, 10)).shape == (10, 10, 10)
    with pytest.raises(GeometryError, match="must be < end"):
        check_block((5, 0, 0), (5, 10, 10), (10, 10, 10))
    with pytest.raises(GeometryError, match="outside the image"):
        check_block((0, 0, 0), (10, 11, 10), (10, 10, 10))
    with pytest.raises(GeometryError, match="outside the image"):
        check_block((-1, 0, 0), (10, 10, 10), (10, 10, 10))


def test_chunk_alignment():
    check_chunk_aligned(Box((64, 0, 0), (128, 64, 100)), (64, 64, 64), (200, 200, 100))  # ends at the image edge
    with pytest.raises(GeometryError, match="not aligned to the output chunk grid"):
        check_chunk_aligned(Box((32, 0, 0), (128, 64, 64)), (64, 64, 64), (200, 200, 100))
    with pytest.raises(GeometryError, match="--allow-unaligned"):
        check_chunk_aligned(Box((0, 0, 0), (100, 64, 64)), (64, 64, 64), (200, 200, 100))


def test_rectangular_tiles_truncate_at_the_end():
    tiles = rectangular_tiles((0, 0, 0), (250, 200, 100), (100, 100, 100))
    assert len(tiles) == 3 * 2 * 1
    assert tiles[0] == Box((0, 0, 0), (100, 100, 100))
    assert tiles[1] == Box((0, 100, 0), (100, 200, 100))  # z fastest, then y, then x
    assert tiles[-1] == Box((200, 100, 0), (250, 200, 100))
