"""The run plan's cost (exllsm_neuronseg.plan_cost, plan_blocks.py --plan-only / --report): empty
space from chunk files and the model's tile grid, voxels to compute, time, output size, bad inputs."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from conftest import run_script
from exllsm_neuronseg.errors import ModelError, ParameterError
from exllsm_neuronseg.geometry import Box, TileGrid, plan_blocks, reflect_index
from exllsm_neuronseg.plan_cost import (
    DEFAULT_RATE_MVOX_S,
    GZIP_RATIOS,
    WrittenChunks,
    estimate_cost,
    load_model,
    read_window,
    run_cost,
)
from exllsm_neuronseg.volume import create_volume, open_volume

SHAPE, CHUNKS = (150, 140, 130), (32, 32, 32)
TISSUE = [(1, 1, 1), (2, 1, 1), (4, 3, 0)]  # chunk indices holding data; every other chunk was never written
TILE = (132, 132, 132)  # a small tile of the published model (output 44^3)


@pytest.fixture
def sparse(tmp_path):
    """A 150x140x130 uint16 N5 (chunks 32^3) with data in three chunks only."""
    volume = create_volume(str(tmp_path / "in.n5"), "c1/s0", SHAPE, CHUNKS, "uint16")
    rng = np.random.default_rng(0)
    for index in TISSUE:
        start = tuple(i * c for i, c in zip(index, CHUNKS))
        size = tuple(min(c, n - s) for s, c, n in zip(start, CHUNKS, SHAPE))
        volume.write_zyx(start, rng.integers(1, 1000, size[::-1]).astype(np.uint16))
    return open_volume(str(tmp_path / "in.n5"), "c1/s0")


def brute_force_empty(volume, box: Box) -> bool:
    """No chunk file under any voxel that reading ``box`` (reflected at the image's edges) touches."""
    index = [np.unique(reflect_index(np.arange(s, e), n) // c) for s, e, n, c in zip(box.start, box.end, volume.shape, volume.chunks)]
    return not any(volume.chunk_file(i).exists() for i in itertools.product(*index))


def test_written_chunks_count_any_box(sparse):
    written = WrittenChunks(sparse)
    assert written.total == 5 * 5 * 5 and written.written == len(TISSUE)
    rng = np.random.default_rng(1)
    for _ in range(200):
        start = tuple(int(rng.integers(0, n)) for n in SHAPE)
        end = tuple(int(rng.integers(s + 1, n + 1)) for s, n in zip(start, SHAPE))
        box = Box(start, end)
        cells = itertools.product(*(range(s // c, -(-e // c)) for s, e, c in zip(start, end, CHUNKS)))
        assert written.count(box) == sum(sparse.chunk_file(i).exists() for i in cells), box


def test_read_window_follows_the_reflection():
    assert read_window(Box((-44, 10, 100), (60, 50, 180)), (150, 140, 130)) == Box((0, 10, 79), (60, 50, 130))
    # a tile far larger than the image reads all of it (reflections bounce back and forth)
    assert read_window(Box((-44, -44, -44), (304, 304, 304)), (20, 30, 40)) == Box((0, 0, 0), (20, 30, 40))


@pytest.mark.parametrize("partition, partial", [(64, None), ((64, 96, 32), "0,0,70,100,60,60"), (512, None)])
def test_empty_tiles_and_voxels_equal_a_brute_force_count(sparse, partition, partial):
    grid = TileGrid((132, 132, 100), (44, 44, 12))  # small tiles: many of them, some straddling blocks
    plan = plan_blocks(sparse.shape, sparse.chunks, partition, partial)
    cost = run_cost(sparse, plan, grid)
    runs = empty = voxels = empty_blocks = 0
    for block in plan.blocks:
        all_empty = True
        for index in grid.tiles(block):
            runs += 1
            if brute_force_empty(sparse, grid.input_box(index)):
                empty += 1
            else:
                all_empty = False
                voxels += grid.owned(index).intersect(block).size
        empty_blocks += all_empty
    assert (cost.tile_runs, cost.empty_tiles, cost.voxels_to_compute, cost.empty_blocks) == (runs, empty, voxels, empty_blocks)
    assert 0 < empty < runs and 0 < voxels < plan.region.size == cost.region_voxels
    assert cost.compute_seconds == pytest.approx(voxels / (DEFAULT_RATE_MVOX_S * 1e6))


def test_time_from_a_given_rate_or_seconds_per_tile(sparse):
    plan = plan_blocks(sparse.shape, sparse.chunks, 64)
    grid = TileGrid((132, 132, 100), (44, 44, 12))
    given = run_cost(sparse, plan, grid, rate_mvox_s=20.0)
    assert given.rate_mvox_s == 20.0 and given.rate_source == "given"
    assert given.compute_seconds == pytest.approx(given.voxels_to_compute / 20e6)
    measured = run_cost(sparse, plan, grid, tile_seconds=0.5)
    model_runs = measured.tile_runs - measured.empty_tiles
    assert measured.compute_seconds == pytest.approx(model_runs * 0.5)
    assert measured.rate_mvox_s == pytest.approx(measured.voxels_to_compute / (model_runs * 0.5) / 1e6)
    # without the model's grid, nothing is known to be empty: every voxel counts
    blind = run_cost(sparse, plan)
    assert blind.tile_runs is None and blind.empty_tiles is None and blind.empty_blocks is None
    assert blind.voxels_to_compute == math.prod(SHAPE)
    assert any("not checked" in line for line in blind.summary_lines())
    for rate in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ParameterError, match="must be a finite number > 0"):
            run_cost(sparse, plan, rate_mvox_s=rate)


@pytest.mark.parametrize("binary", [False, True])
def test_output_size_on_disk(sparse, binary):
    plan = plan_blocks(sparse.shape, sparse.chunks, 64, "40,0,0,50,140,20")  # x 40..90, z 0..20
    cost = run_cost(sparse, plan, binary=binary)
    itemsize = 1 if binary else 4
    # the region meets chunks x 1..2, every y, z 0: written whole (clipped to the image)
    chunks = [(x, y, 0) for x in (1, 2) for y in range(5)]
    sizes = {i: math.prod(min(c, n - k * c) for k, c, n in zip(i, CHUNKS, SHAPE)) for i in chunks}
    assert cost.output_chunks == len(chunks)
    assert cost.output_bytes == sum(sizes.values()) * itemsize
    full, empty = GZIP_RATIOS["uint8" if binary else "float32"]
    with_data = sum(v for i, v in sizes.items() if i in TISSUE) * itemsize  # (1,1,1), (2,1,1) are at z 1: none here
    assert with_data == 0 and cost.output_bytes_gzip == int(cost.output_bytes * empty)
    whole = run_cost(sparse, plan_blocks(sparse.shape, sparse.chunks, 512), binary=binary)
    data_bytes = sum(math.prod(min(c, n - k * c) for k, c, n in zip(i, CHUNKS, SHAPE)) for i in TISSUE) * itemsize
    assert whole.output_bytes == math.prod(SHAPE) * itemsize
    assert whole.output_bytes_gzip == int(data_bytes * full + (whole.output_bytes - data_bytes) * empty)


def test_the_model_file_gives_the_tile_grid(sparse, model_path):
    plan = plan_blocks(sparse.shape, sparse.chunks, 64)
    predictor = load_model(model_path, sparse.shape)  # the blocks' default tile for this image; no TensorFlow
    cost = estimate_cost(sparse, plan, model_path)
    assert cost.model["context"] == [44, 44, 44] and cost.model["tile_input_shape"] == list(predictor.input_shape)
    assert cost.model["sha256"] == predictor.fingerprint
    assert cost.tile_runs == sum(predictor.grid.count(b) for b in plan.blocks)
    small = estimate_cost(sparse, plan, model_path, TILE)
    assert small.model["tile_output_shape"] == [44, 44, 44] and small.tile_runs > cost.tile_runs
    with pytest.raises(ModelError):
        estimate_cost(sparse, plan, sparse.path / "no-model.h5")
    with pytest.raises(ParameterError, match="a model file is needed"):
        estimate_cost(sparse, plan, measure=True)


def test_plan_only_prints_and_reports(sparse, model_path, tmp_path):
    blocks, jobs, report = tmp_path / "blocks.txt", tmp_path / "jobs.txt", tmp_path / "plan.json"
    proc = run_script(
        "plan_blocks.py", "-i", sparse.container, "-id", "/c1/s0", "--partition-size", "64", "-o", blocks,
        "--scaling_output", jobs, "--model", model_path, "--tile-shape", "132,132,132", "--plan-only", "--report", report,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("planned 27 blocks of 64,64,64") and len(lines) == 6
    assert lines[2].strip().startswith("tiles: ") and "wholly in empty space" in lines[2]
    assert "per device at 4.7 Mvox/s (default" in lines[4] and "with gzip (estimate)" in lines[5]
    # the plan files are written too: they are what a later run uses
    assert len(blocks.read_text().splitlines()) == 27 and jobs.read_text() == ""
    record = json.loads(report.read_text())
    direct = run_cost(sparse, plan_blocks(sparse.shape, sparse.chunks, 64), load_model(model_path, sparse.shape, TILE).grid)
    assert record["voxels_to_compute"] == direct.voxels_to_compute and record["empty_tiles"] == direct.empty_tiles
    assert record["blocks"] == 27 and record["model"]["context"] == [44, 44, 44] and record["output_dtype"] == "float32"
    assert record["compute_device_hours"] == pytest.approx(record["compute_seconds"] / 3600)
    # without --plan-only or --report, plan_blocks.py says what it always said
    quiet = run_script("plan_blocks.py", "-i", sparse.container, "-id", "/c1/s0", "-o", blocks, "--scaling_output", jobs, check=True)
    assert quiet.stdout.startswith("planned 1 blocks") and len(quiet.stdout.splitlines()) == 1
    given = run_script(
        "plan_blocks.py", "-i", sparse.container, "-id", "/c1/s0", "-o", blocks, "--scaling_output", jobs,
        "--rate-mvox-s", "100", "--as-binary-mask", "--report", report, check=True,
    )
    assert len(given.stdout.splitlines()) == 1
    record = json.loads(report.read_text())
    assert record["rate_mvox_s"] == 100 and record["output_dtype"] == "uint8" and record["tile_runs"] is None


BAD = {
    "zero rate": (["--rate-mvox-s", "0"], "must be a finite number > 0"),
    "nan rate": (["--rate-mvox-s", "nan"], "must be a finite number > 0"),
    "measure without a model": (["--measure-rate"], "give --model too"),
    "measure and a rate": (["--measure-rate", "--model", "MODEL", "--rate-mvox-s", "3"], "not both"),
    "tile shape without a model": (["--tile-shape", "132,132,132", "--plan-only"], "give --model too"),
    "missing model": (["--model", "/nonexistent/model.h5", "--plan-only"], "does not exist"),
    "bad tile shape": (["--model", "MODEL", "--tile-shape", "101,101,101", "--plan-only"], "101"),
    "report is a directory": (["--report", "DIR"], "is empty or a directory"),
    "report over the plan": (["--report", "BLOCKS"], "over the plan file"),
    "bad precision": (["--model", "MODEL", "--precision", "fp8", "--plan-only"], "fp8"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_one_line_and_write_nothing(case, sparse, model_path, tmp_path):
    args, message = BAD[case]
    out = tmp_path / "out"
    out.mkdir()
    names = {"MODEL": str(model_path), "DIR": str(out), "BLOCKS": str(out / "blocks.txt")}
    args = [names.get(a, a) for a in args]
    proc = run_script("plan_blocks.py", "-i", sparse.container, "-id", "/c1/s0", "-o", out / "blocks.txt",
                      "--scaling_output", out / "jobs.txt", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (case, proc.stderr)
    assert message in lines[0], (case, lines[0])
    assert list(out.iterdir()) == [], case


@pytest.mark.slow
def test_measured_rate_and_the_empty_tiles_segmentation_skips(sparse, model_path, tmp_path):
    """The tiles the plan finds wholly in empty space are exactly those segmentation answers without
    the model; --measure-rate times tiles of this model here."""
    from exllsm_neuronseg.segment import segment_blocks

    tile = TILE
    plan = plan_blocks(sparse.shape, sparse.chunks, 64)
    cost = estimate_cost(sparse, plan, model_path, tile, measure=True)
    assert cost.tile_seconds > 0 and "measured here" in cost.rate_source
    assert cost.compute_seconds == pytest.approx((cost.tile_runs - cost.empty_tiles) * cost.tile_seconds)
    output = create_volume(str(tmp_path / "out.n5"), "s0", sparse.shape, sparse.chunks, "float32")
    results = segment_blocks(sparse, output, model_path, [(b.start, b.end) for b in plan.blocks], input_shape=tile, scaling=0.00045)
    assert sum(r.constant_tiles for r in results) == cost.empty_tiles
    assert sum(r.model_tiles for r in results) == cost.tile_runs - cost.empty_tiles
    proc = run_script(
        "plan_blocks.py", "-i", sparse.container, "-id", "/c1/s0", "-o", tmp_path / "b.txt", "--scaling_output",
        tmp_path / "j.txt", "--model", model_path, "--tile-shape", "132,132,132", "--measure-rate", "--plan-only", check=True,
    )
    assert "measured here" in proc.stdout and proc.stderr.startswith("measured ")
