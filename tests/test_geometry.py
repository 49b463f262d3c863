"""Block and tile geometry (pure arithmetic, no model)."""

from __future__ import annotations

import itertools
import logging
import random

import numpy as np
import pytest

from exllsm_neuronseg.errors import GeometryError
from exllsm_neuronseg.geometry import (
    Box,
    TileGrid,
    check_block,
    check_chunk_aligned,
    grid_count,
    parse_xyz,
    plan_blocks,
    plan_scaling,
    processed_region,
    rectangular_tiles,
    reflect_index,
)


def test_parse_xyz():
    assert parse_xyz("1,2,3") == (1, 2, 3)
    assert parse_xyz("512") == (512, 512, 512)
    assert parse_xyz([4, 5, 6]) == (4, 5, 6)
    assert parse_xyz(250) == (250, 250, 250)
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
    with pytest.raises(GeometryError, match="multiples of 64 \\(or the image edge 200\\)"):
        check_chunk_aligned(Box((0, 0, 0), (100, 64, 64)), (64, 64, 64), (200, 200, 100))


def test_chunk_alignment_in_a_region():
    """A block clipped to the processed region may start and end on the region's edges, nowhere
    else off the chunk grid: a chunk the region cuts belongs to the one block at that edge."""
    image, chunks = (1000, 1000, 600), (64, 64, 64)
    region = processed_region("100,0,0,500,512,100", image)  # x [100, 600), z [0, 100)
    for start, end in [((100, 0, 0), (512, 64, 64)), ((512, 0, 0), (600, 64, 64)), ((100, 448, 64), (600, 512, 100))]:
        check_chunk_aligned(Box(start, end), chunks, image, region)
    refused = {
        ((200, 0, 0), (512, 64, 64)): "not aligned",  # starts inside a chunk the block before it writes
        ((128, 0, 0), (590, 64, 64)): "not aligned",  # ends inside a chunk the block after it writes
        ((0, 0, 0), (100, 64, 64)): "does not lie in the processed region",  # outside (ends at the region's start)
        ((512, 0, 64), (600, 64, 128)): "does not lie in the processed region",
    }
    for (start, end), message in refused.items():
        with pytest.raises(GeometryError, match=message):
            check_chunk_aligned(Box(start, end), chunks, image, region)
    # the whole image is the default region: the same rule as before
    with pytest.raises(GeometryError, match="not aligned"):
        check_chunk_aligned(Box((100, 0, 0), (512, 64, 64)), chunks, image)


def test_processed_region_is_the_hosts_partial_volume():
    image = (1000, 1000, 600)
    assert processed_region("", image) == processed_region(None, image) == Box((0, 0, 0), image)
    assert processed_region("100,0,0,512,512,512", image) == Box((100, 0, 0), (612, 512, 512))  # start + size
    assert processed_region(" 900, 0, 0, 512, 512, 512", image) == Box((900, 0, 0), (1000, 512, 512))  # clipped
    assert processed_region([0, 0, 599, 1, 1, 1], image) == Box((0, 0, 599), (1, 1, 600))
    bad = {
        "0,0,0,10,10": "must have 6 values x0,y0,z0,dx,dy,dz",
        "0,0,0,a,10,10": "is not 'x0,y0,z0,dx,dy,dz' with integer values",
        "0,1000,0,10,10,10": "outside the image 1000,1000,600 on axis y",
        "-1,0,0,10,10,10": "on axis x",
        "0,0,0,10,0,10": "every size must be >= 1",
    }
    for text, message in bad.items():
        with pytest.raises(GeometryError, match=message):
            processed_region(text, image)


def as_pairs(blocks):
    return [(b.start, b.end) for b in blocks]


def test_blocks_follow_the_host_arithmetic():
    """The numbers of the host's partition_volume (contract 1.2 f), as the Groovy planner had them."""
    plan = plan_blocks((128, 100, 64), (64, 64, 64), 64)
    assert as_pairs(plan.blocks) == [  # x fastest, end-exclusive, clipped to the volume
        ((0, 0, 0), (64, 64, 64)),
        ((64, 0, 0), (128, 64, 64)),
        ((0, 64, 0), (64, 100, 64)),
        ((64, 64, 0), (128, 100, 64)),
    ]
    plan = plan_blocks((1000, 1000, 600), (512, 512, 512), "512", "0,0,0,600,512,512")
    assert as_pairs(plan.blocks) == [((0, 0, 0), (512, 512, 512)), ((512, 0, 0), (600, 512, 512))]
    plan = plan_blocks((1000, 1000, 600), (512, 512, 512), (1024, 512, 512))
    assert plan.partition_size == (1024, 512, 512) and len(plan.blocks) == 1 * 2 * 2
    # a region on the chunk grid: blocks from its start, start = origin + k * partition size
    plan = plan_blocks((3000, 600, 600), (512, 512, 512), 1024, "512,0,0,3000,600,600")
    assert [b.start[0] for b in plan.blocks[:2]] == [512, 1536] and plan.blocks[2].end[0] == 3000


def test_the_hosts_reference_example_runs(caplog):
    """examples/neuron_seg.sh: --block_size 250,250,250 --partial_volume 0,0,0,250,250,250
    --volume_partition_size 250: one block; on 512^3 chunks the partition rounds up to 512."""
    with caplog.at_level(logging.WARNING):
        plan = plan_blocks((600, 600, 300), (250, 250, 250), 250, "0,0,0,250,250,250")
    assert as_pairs(plan.blocks) == [((0, 0, 0), (250, 250, 250))] and not caplog.records
    with caplog.at_level(logging.WARNING):
        plan = plan_blocks((600, 600, 300), (512, 512, 512), 250, "0,0,0,250,250,250")
    assert as_pairs(plan.blocks) == [((0, 0, 0), (250, 250, 250))] and plan.partition_size == (512, 512, 512)
    (record,) = caplog.records
    assert "partition size 250,250,250 is not a multiple of the chunk size 512,512,512" in record.getMessage()


def test_partition_rounds_up_to_whole_chunks(caplog):
    with caplog.at_level(logging.WARNING):
        plan = plan_blocks((1000, 1000, 600), (512, 256, 64), "396,256,100")
    assert plan.partition_size == (512, 256, 128)
    (record,) = caplog.records
    assert "396,256,100" in record.getMessage() and "512,256,64" in record.getMessage()
    for bad in ("0", "1,2", "a"):
        with pytest.raises(GeometryError, match="partition size"):
            plan_blocks((100, 100, 100), (10, 10, 10), bad)


def test_region_off_the_chunk_grid_is_cut_on_the_chunk_grid():
    """A region may start and end anywhere: the first block runs to the first partition boundary
    after the region's first chunk boundary, so no block is thinner than a partition minus a chunk."""
    plan = plan_blocks((1000, 1000, 600), (64, 64, 64), (256, 512, 512), "600,0,0,400,512,100")
    assert plan.region == Box((600, 0, 0), (1000, 512, 100))
    assert [(b.start[0], b.end[0]) for b in plan.blocks] == [(600, 832), (832, 1000)]
    assert all(b.end[2] == 100 for b in plan.blocks)


def check_plan(plan, image):
    """The properties parallel jobs rely on, for any plan."""
    region, chunks = plan.region, plan.chunks
    covered = np.zeros(region.shape, dtype=np.uint8)
    owner: dict[tuple[int, int, int], int] = {}
    for i, block in enumerate(plan.blocks):
        assert not block.empty and region.contains(block), (block, region)
        check_chunk_aligned(block, chunks, image, region)  # the rule segment_volume.py applies
        covered[block.slices(region.start)] += 1
        first = [s // c for s, c in zip(block.start, chunks)]
        last = [(e - 1) // c for e, c in zip(block.end, chunks)]
        for chunk in itertools.product(*(range(f, la + 1) for f, la in zip(first, last))):
            assert owner.setdefault(chunk, i) == i, f"chunk {chunk} is written by blocks {owner[chunk]} and {i}"
    assert (covered == 1).all()  # the blocks tile the region exactly
    assert list(plan.blocks) == sorted(plan.blocks, key=lambda b: b.start[::-1])  # x fastest, then y, then z


def test_blocks_tile_any_region_without_sharing_a_chunk():
    rng = random.Random(8)
    for _ in range(300):
        image = tuple(rng.randint(1, 90) for _ in range(3))
        chunks = tuple(rng.randint(3, 40) for _ in range(3))
        partition = tuple(rng.randint(1, 100) for _ in range(3))
        start = [rng.randrange(n) for n in image]
        size = [rng.randint(1, n + 20) for n in image]
        partial = ",".join(map(str, start + size)) if rng.random() < 0.8 else ""
        plan = plan_blocks(image, chunks, partition, partial)
        assert all(p % c == 0 and p >= q for p, c, q in zip(plan.partition_size, chunks, partition))
        check_plan(plan, image)


def test_a_block_moved_into_its_neighbours_chunk_is_refused():
    image, chunks = (300, 200, 100), (32, 32, 32)
    plan = plan_blocks(image, chunks, 64, "10,5,0,250,190,100")
    inner = [b for b in plan.blocks if b.start[0] % 32 == 0 and b.start[0] > 10]
    assert inner
    for block in inner:
        moved = Box((block.start[0] + 1, *block.start[1:]), block.end)
        with pytest.raises(GeometryError, match="not aligned"):
            check_chunk_aligned(moved, chunks, image, plan.region)


def test_scaling_jobs_follow_the_host_arithmetic():
    """The host's neuron_scaling_factor numbers (contract 1.2 d) on a 5000^3 volume."""
    image = (5000, 5000, 5000)
    plan = plan_scaling(image, fraction=0.1)  # job edge int(396 * cbrt(40 / 0.1)) = 2917: 2 x 2 x 2 jobs
    assert (plan.fraction, plan.job_edge, len(plan.jobs)) == (0.1, 2917, 8)
    assert plan.jobs[1] == Box((2917, 0, 0), (5000, 2917, 2917))  # x fastest, clipped
    plan = plan_scaling(image, tiles=100)  # 100 of the 13^3 sampling tiles; the count wins over the fraction
    assert plan.n_tiles == 13**3 and plan.fraction == pytest.approx(100 / 13**3)
    assert plan.job_edge == 3793 and len(plan.jobs) == 8
    assert plan_scaling(image, tiles=100, fraction=0.5).fraction == plan.fraction
    for inactive in ({"fraction": 1}, {}, {"fraction": 0}, {"tiles": -3}, {"fraction": 1.5}):
        off = plan_scaling(image, **inactive)
        assert off.jobs == () and off.fraction == 0 and not off.active
    with pytest.raises(GeometryError, match="must be >= 1"):
        plan_scaling(image, fraction=0.1, max_tiles_per_job=0)


def test_scaling_jobs_cover_the_region_from_its_start():
    image = (5000, 5000, 5000)
    plan = plan_scaling(image, fraction=0.1, tile_size="396,396,396", partial_volume="1000,0,0,3000,100,100")
    assert plan.n_tiles == 8 * 1 * 1  # ceil(3000 / 396) = 8
    assert as_pairs(plan.jobs) == [((1000, 0, 0), (3917, 100, 100)), ((3917, 0, 0), (4000, 100, 100))]
    plan = plan_scaling(image, fraction=0.2, tile_size=(100, 50, 70), max_tiles_per_job=3)
    assert plan.job_edge == int(50 * (3 / 0.2) ** (1 / 3)) == 123
    assert grid_count(plan.region, (100, 50, 70), (0, 0, 0)) == plan.n_tiles == 50 * 100 * 72
    covered = sum(job.size for job in plan.jobs)
    assert covered == plan.region.size and plan.region.contains(plan.jobs[-1])


def test_rectangular_tiles_truncate_at_the_end():
    tiles = rectangular_tiles((0, 0, 0), (250, 200, 100), (100, 100, 100))
    assert len(tiles) == 3 * 2 * 1
    assert tiles[0] == Box((0, 0, 0), (100, 100, 100))
    assert tiles[1] == Box((0, 100, 0), (100, 200, 100))  # z fastest, then y, then x
    assert tiles[-1] == Box((200, 100, 0), (250, 200, 100))
