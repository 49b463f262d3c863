"""The stage scripts as users and the host run them: flags, summaries, and every bad input
(one line on stderr, exit 2, no traceback, existing output untouched)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, SCALING, run_script

from exllsm_neuronseg.volume import create_volume, open_volume


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture()
def volumes(synthetic_n5, tmp_path):
    """The synthetic input plus a fresh float32 output dataset with one known voxel written."""
    path, _ = synthetic_n5
    out = create_volume(tmp_path / "out.n5", "seg/s0", (150, 140, 130), (32, 32, 32), "float32")
    out.write_zyx((0, 0, 0), np.full((1, 1, 1), 0.5, np.float32))
    return path, tmp_path / "out.n5"


def host_args(inp, out, model, **over):
    """The host pipeline's command line (contract 2.6) with defaults for a 64^3 block."""
    args = {
        "-i": inp, "-id": "/c1/s0", "-o": out, "-od": "/seg/s0", "-m": model,
        "--image_shape": "150,140,130", "--start": "0,0,0", "--end": "64,64,64", "--scaling": SCALING,
        "--unet_batch_size": 1, "--model_input_shape": "220,220,220", "--model_output_shape": "132,132,132",
        "--high_threshold": 0.98, "--low_threshold": 0.2,
        "--small_region_probability_threshold": 0.9, "--small_region_size_threshold": 1000,
    }
    args.update(over)
    flat = []
    for k, v in args.items():
        if v is None:
            continue
        flat += [k] if v is True else [k, str(v)]
    return flat


def test_host_command_line_runs_unchanged(volumes, model_path):
    inp, out = volumes
    proc = run_script("segment_volume.py", *host_args(inp, out, model_path), "--set_gpu_mem_growth", "--no-progress", check=True)
    assert proc.stdout.strip().splitlines()[-1].startswith("block [0,0,0 .. 64,64,64): 1 tiles in")
    seg = open_volume(out, "seg/s0")
    block = seg.read(seg.box)[:64, :64, :64]
    assert block[0, 0, 0] != 0.5 and block.max() > 0.1  # the known voxel was overwritten with a probability
    whole = seg.read(seg.box)
    assert (whole[64:] == 0).all() and (whole[:, 64:] == 0).all() and (whole[:, :, 64:] == 0).all()


def test_short_aliases_and_kebab_case(volumes, model_path):
    inp, out = volumes
    proc = run_script(
        "segment_volume.py", "-i", inp, "--input-dataset", "/c1/s0", "-o", out, "--output-dataset", "seg/s0",
        "--model", model_path, "-s", SCALING, "--start", "64,64,64", "--end", "128,128,128",
        "--model-input-shape", "132,132,132", "--model-output-shape", "44,44,44", "-ht", "0.98", "-lt", "0.2",
        "--with-post-processing", "--small-region-size-threshold", "10", "--no-progress", check=True,
    )
    assert "Mvox/s" in proc.stdout


def test_tile_shape_auto_and_output_shape_alone(volumes, model_path):
    inp, out = volumes
    common = ["-i", inp, "-id", "/c1/s0", "-o", out, "-od", "seg/s0", "-m", model_path, "-s", SCALING,
              "--start", "0,0,64", "--end", "64,64,128", "--no-progress", "--redo"]
    auto = run_script("segment_volume.py", *common, "--tile-shape", "auto", "--model_output_shape", "auto", check=True)
    assert ": 1 tiles in" in auto.stdout  # the default tiles cover the 64^3 block with one tile
    small = run_script("segment_volume.py", *common, "--model_output_shape", "44,44,44", check=True)
    assert ": 12 tiles in" in small.stdout  # an output shape alone sets 132^3 tiles: stride 40, 2 x 2 x 3


def test_help_and_version_are_instant():
    for script in ("segment_volume.py", "scaling_factor.py", "create_volume.py", "make_test_volume.py", "plan_blocks.py"):
        t = time.perf_counter()
        proc = run_script(script, "--help", check=True)
        assert time.perf_counter() - t < 5 and "Usage" in proc.stdout
        assert "exllsm-neuronseg" in run_script(script, "--version", check=True).stdout


STAGE_SCRIPTS = sorted(p.name for p in BIN.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", STAGE_SCRIPTS)
def test_parameter_errors_are_one_line(script):
    """typer's own errors (an unknown flag, a missing value) are one `error:` line and exit 2, like the
    library's, in every stage script."""
    for args, message in (
        (["--no-such-flag"], "No such option: --no-such-flag"),
        (["--version", "--help", "--input"], "requires an argument"),
    ):
        proc = run_script(script, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (script, proc.stderr)
        assert message in lines[0] or "No such option: --input" in lines[0], (script, lines)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="the warning is for root; this runs as another user")
def test_root_inside_an_image_is_warned_about():
    """In a stage image (EXLLSM_IMAGE set) as root, files written belong to root on the host: the
    stage says so before writing; outside an image (no EXLLSM_IMAGE) nothing is said."""
    inside = run_script("plan_blocks.py", "--version", env={"EXLLSM_IMAGE": "exllsm-create-volume"})
    assert inside.returncode == 0 and "running as root in the exllsm-create-volume image" in inside.stderr
    assert '-u "$(id -u):$(id -g)"' in inside.stderr
    outside = run_script("plan_blocks.py", "--version", env={"EXLLSM_IMAGE": ""})
    assert outside.returncode == 0 and outside.stderr == ""


def test_range_errors_are_one_line():
    proc = run_script("segment_volume.py", "-i", "x", "-o", "y", "-m", "z", "--io-threads", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: Invalid value for '--io-threads': Input should be greater than or equal to 1"
    ), proc.stderr


BAD_SEGMENT_INPUTS = {
    "missing container": ({"-i": "/nonexistent/in.n5"}, "container /nonexistent/in.n5 does not exist"),
    "missing dataset": ({"-id": "/c9/s0"}, "dataset /c9/s0 does not exist"),
    "dataset is a group": ({"-id": "/c1"}, "is a group, not a dataset"),
    "start >= end": ({"--start": "64,0,0", "--end": "64,64,64"}, "must be < end"),
    "box outside image": ({"--start": "128,0,0", "--end": "192,64,64"}, "outside the image"),
    "malformed start": ({"--start": "0,0"}, "must have 3 values"),
    "image_shape disagrees": ({"--image_shape": "150,140,131"}, "disagrees"),
    "model missing": ({"-m": "/nonexistent/model.h5"}, "does not exist"),
    "bad tile shape": ({"--model_input_shape": "200,200,200", "--model_output_shape": None}, "is not valid for this U-Net"),
    "tile shapes disagree": ({"--model_output_shape": "130,130,130"}, "does not match input shape"),
    "output dataset missing": ({"-od": "/nope/s0"}, "create_volume.py"),
    "unaligned block": ({"--start": "16,0,0", "--end": "64,64,64"}, "not aligned to the output chunk grid"),
    "block in a neighbour's chunk": (
        {"--start": "40,0,0", "--end": "64,64,64", "--partial_volume": "16,0,0,100,64,64"},
        "not aligned to the output chunk grid",  # 40 is neither on the chunk grid nor the region's start
    ),
    "block outside the region": ({"--partial_volume": "0,0,0,32,64,64"}, "does not lie in the processed region"),
    "malformed partial volume": ({"--partial_volume": "0,0,0,64,64"}, "must have 6 values x0,y0,z0,dx,dy,dz"),
    "partial volume outside image": ({"--partial_volume": "0,140,0,64,64,64"}, "outside the image"),
    "nan scaling": ({"--scaling": "nan"}, "scaling factor 'nan': that is what the scaling step prints"),
    "infinite scaling": ({"--scaling": "inf"}, "scaling factor inf cannot be used"),
    "zero scaling": ({"--scaling": "0"}, "must be a finite number > 0"),
    "negative scaling": ({"--scaling": "-0.001"}, "must be a finite number > 0"),
    "batch size 0": ({"--unet_batch_size": "0"}, "unet_batch_size"),
}


@pytest.mark.parametrize("case", list(BAD_SEGMENT_INPUTS))
def test_bad_segmentation_input(case, volumes, model_path):
    inp, out = volumes
    over, message = BAD_SEGMENT_INPUTS[case]
    before = tree_digest(out)
    proc = run_script("segment_volume.py", *host_args(inp, out, model_path, **over), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:") or "Error" in line]) == 1
    assert tree_digest(out) == before


def test_output_that_is_the_input_is_refused(volumes, model_path):
    """Segmenting a dataset into itself would overwrite the raw data: refused, nothing written."""
    inp, out = volumes
    before = tree_digest(inp)
    proc = run_script(
        "segment_volume.py", *host_args(inp, out, model_path, **{"-o": str(inp), "-od": "c1//s0/"}), "--as_binary_mask", "--no-progress"
    )
    assert proc.returncode == 2 and "is the input dataset itself" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert tree_digest(inp) == before


def test_bad_model_files(volumes, model_path, tmp_path):
    inp, out = volumes
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n but truncated")
    foreign = tmp_path / "foreign.h5"
    import h5py

    with h5py.File(foreign, "w") as h5:
        h5.attrs["model_config"] = '{"class_name": "Model", "config": {"layers": []}}'
    before = tree_digest(out)
    for path, message in ((corrupt, "not a readable HDF5 file"), (foreign, "not this U-Net")):
        proc = run_script("segment_volume.py", *host_args(inp, out, path), "--no-progress")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert tree_digest(out) == before


def test_output_of_other_dims_or_dtype(synthetic_n5, model_path, tmp_path):
    inp, _ = synthetic_n5
    create_volume(tmp_path / "o.n5", "small/s0", (64, 64, 64), (32, 32, 32), "float32")
    create_volume(tmp_path / "o.n5", "bytes/s0", (150, 140, 130), (32, 32, 32), "uint8")
    proc = run_script("segment_volume.py", *host_args(inp, tmp_path / "o.n5", model_path, **{"-od": "small/s0"}))
    assert proc.returncode == 2 and "has dims 64,64,64, but the input has 150,140,130" in proc.stderr
    proc = run_script("segment_volume.py", *host_args(inp, tmp_path / "o.n5", model_path, **{"-od": "bytes/s0"}))
    assert proc.returncode == 2 and "need a float dataset" in proc.stderr


def test_not_3d_input(tmp_path, model_path):
    import zarr

    zarr.open(str(tmp_path / "flat.zarr"), mode="w", shape=(64, 64), chunks=(32, 32), dtype="u2")
    proc = run_script("segment_volume.py", "-i", tmp_path / "flat.zarr", "-id", "", "-o", tmp_path / "x.n5", "-m", model_path)
    assert proc.returncode == 2 and "3-D x,y,z volume is required" in proc.stderr


def test_create_volume_cli(synthetic_n5, tmp_path):
    inp, _ = synthetic_n5
    out = tmp_path / "res.n5"
    first = run_script("create_volume.py", "-i", inp, "-id", "/c1/s0", "-o", out, "-od", "/segmented/s0", check=True)
    assert "shape 150,140,130, chunks 32,32,32, float32" in first.stdout
    vol = open_volume(out, "segmented/s0", mode="r+")
    vol.write_zyx((0, 0, 0), np.ones((4, 4, 4), np.float32))
    run_script("create_volume.py", "-i", inp, "-id", "/c1/s0", "-o", out, "-od", "/segmented/s0", check=True)
    assert open_volume(out, "segmented/s0").read(vol.box).sum() == 64  # kept
    refused = run_script("create_volume.py", "-i", inp, "-id", "/c1/s0", "-o", out, "-od", "/segmented/s0", "--as_binary_mask")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert open_volume(out, "segmented/s0").read(vol.box).sum() == 64
    run_script("create_volume.py", "-i", inp, "-id", "/c1/s0", "-o", out, "-od", "/segmented/s0", "--as_binary_mask", "--overwrite", check=True)
    assert open_volume(out, "segmented/s0").dtype == np.uint8
    bad = run_script("create_volume.py", "-i", inp, "-id", "/c1/s0", "-o", out, "-od", "/x", "--dtype", "int64")
    assert bad.returncode == 2 and "not supported" in bad.stderr


def test_scaling_factor_cli_bad_input(synthetic_n5):
    inp, _ = synthetic_n5
    for args, message in (
        (("-i", "/nonexistent.n5"), "does not exist"),
        (("-i", inp, "-d", "/c1/s0", "--start", "0,0,0", "--end", "200,10,10"), "outside the image"),
        (("-i", inp, "-d", "/c1/s0", "--partition_size", "0,10,10"), ">= 1"),
    ):
        proc = run_script("scaling_factor.py", *args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_block_clipped_to_a_partial_volume_runs(synthetic_n5, volumes, model_path, tmp_path):
    """The planner's blocks run as they are: a block the region cuts off the chunk grid is accepted
    when segment_volume.py is told the region (and refused without it)."""
    inp, out = volumes
    region = "16,8,0,40,56,64"  # x [16, 56), y [8, 64): both start and end off the 32^3 chunk grid
    planned = run_script(
        "plan_blocks.py", "-i", inp, "-id", "/c1/s0", "--partition_size", "64", "--partial_volume", region,
        "-o", tmp_path / "blocks.txt", "--scaling_output", tmp_path / "jobs.txt", check=True,
    )
    assert planned.stdout.startswith("planned 1 blocks of 64,64,64 over region [16,8,0 .. 56,64,64)")
    (block,) = (tmp_path / "blocks.txt").read_text().splitlines()
    x0, y0, z0, x1, y1, z1 = block.split(",")
    box = {"--start": f"{x0},{y0},{z0}", "--end": f"{x1},{y1},{z1}"}
    refused = run_script("segment_volume.py", *host_args(inp, out, model_path, **box), "--no-progress")
    assert refused.returncode == 2 and "not aligned to the output chunk grid" in refused.stderr
    proc = run_script(
        "segment_volume.py", *host_args(inp, out, model_path, **box, **{"--partial_volume": region}), "--no-progress",
        check=True,
    )
    assert proc.stdout.strip().splitlines()[-1].startswith("block [16,8,0 .. 56,64,64): 1 tiles in")
    seg = open_volume(out, "seg/s0").read(open_volume(out, "seg/s0").box)
    written = np.zeros(seg.shape, bool)
    written[16:56, 8:64, :64] = True
    assert (seg[written] > 0).all()  # probabilities, never exactly 0
    assert seg[0, 0, 0] == 0.5 and (seg[~written] == 0).sum() == seg.size - written.sum() - 1  # nothing else


def test_plan_blocks_cli(synthetic_n5, tmp_path):
    inp, _ = synthetic_n5  # 150 x 140 x 130, chunks 32^3
    blocks, jobs = tmp_path / "blocks.txt", tmp_path / "jobs.txt"
    proc = run_script(
        "plan_blocks.py", "--input", inp, "--input-dataset", "c1/s0", "--partition-size", "50,64,200",
        "--partial-volume", "10,0,0,100,1000,1000", "--output", blocks, "--scaling-output", jobs,
        "--scaling-fraction", "0.5", "--scaling-partition-size", "20", "--max-scaling-tiles-per-job", "5",
        check=True,
    )
    # 50 and 200 are not multiples of 32: rounded up to 64 and 224, with one warning line
    assert "partition size 50,64,200 is not a multiple of the chunk size 32,32,32: using 64,64,224" in proc.stderr
    assert proc.stdout.strip() == (
        "planned 6 blocks of 64,64,224 over region [10,0,0 .. 110,140,130) (chunks 32,32,32); "
        "48 scaling jobs of edge 43, each sampling 0.5 of its tiles (245 in all)"
    )
    assert blocks.read_text().splitlines() == [
        "10,0,0,64,64,130", "64,0,0,110,64,130",
        "10,64,0,64,128,130", "64,64,0,110,128,130",
        "10,128,0,64,140,130", "64,128,0,110,140,130",
    ]
    lines = jobs.read_text().splitlines()
    assert len(lines) == 48 and lines[:2] == ["10,0,0,53,43,43 0.5", "53,0,0,96,43,43 0.5"]
    # the host's defaults: 512^3 blocks, no sampling (an empty jobs file)
    run_script("plan_blocks.py", "-i", inp, "-id", "/c1/s0", "-o", blocks, "--scaling_output", jobs, check=True)
    assert blocks.read_text() == "0,0,0,150,140,130\n" and jobs.read_text() == ""
    run_script("plan_blocks.py", "-i", inp, "-id", "/c1/s0", "-o", blocks, "--scaling_output", jobs, "--scaling_tiles", "7", check=True)
    assert jobs.read_text() == "0,0,0,150,140,130 7.0\n"  # 7 tiles of the 1 tile of 396^3: -p 7.0 (all of it)


def test_plan_blocks_cli_bad_input(synthetic_n5, tmp_path):
    inp, _ = synthetic_n5
    out = ["-o", tmp_path / "blocks.txt", "--scaling_output", tmp_path / "jobs.txt"]
    for args, message in (
        (("-i", "/nonexistent.n5"), "does not exist"),
        (("-i", inp, "-id", "/c1"), "is a group, not a dataset"),
        (("-i", inp, "-id", "/c1/s0", "--partial_volume", "0,0,0,10,10"), "must have 6 values"),
        (("-i", inp, "-id", "/c1/s0", "--partial_volume", "150,0,0,10,10,10"), "outside the image 150,140,130 on axis x"),
        (("-i", inp, "-id", "/c1/s0", "--partition_size", "0"), ">= 1"),
        (("-i", inp, "-id", "/c1/s0", "--scaling_partition_size", "a,b,c", "--scaling_fraction", "0.1"), "integer values"),
    ):
        proc = run_script("plan_blocks.py", *args, *out)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "blocks.txt").exists()
