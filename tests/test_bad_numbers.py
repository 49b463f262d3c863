"""Bad numbers never pass (issue 9, item 4): NaN or infinite input voxels, scaling factors that
overflow or underflow float32, thresholds and sizes out of range. Each is one `error:` line and exit
2 where users meet it (the stage scripts), with nothing written; the library raises typed errors.

Only two tests load TensorFlow (the non-finite check runs where a tile is read, while the model
loads) and one of them runs the model on one small tile."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import SCALING, run_script

from exllsm_neuronseg.errors import InputValueError, ParameterError, ScalingError
from exllsm_neuronseg.geometry import Box
from exllsm_neuronseg.postprocess import check_thresholds, post_process
from exllsm_neuronseg.scaling import check_scaled_values, check_scaling_factor, choose_tiles
from exllsm_neuronseg.segment import PostProcessing
from exllsm_neuronseg.volume import create_volume, io_executor, open_volume

from test_cli import host_args, tree_digest


def error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def assert_one_error(proc, *fragments: str) -> str:
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---- thresholds and sizes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "high, low, prob, size, message",
    [
        (2.0, 0.2, 0.9, 1000, "high threshold 2.0 must be a finite number in [0, 1]"),
        (0.98, -1.0, 0.9, 1000, "low threshold -1.0 must be a finite number in [0, 1]"),
        (math.nan, 0.2, 0.9, 1000, "high threshold nan"),
        (math.inf, 0.2, 0.9, 1000, "high threshold inf"),
        (0.5, 0.9, 0.9, 1000, "low threshold 0.9 is above the high threshold 0.5"),
        (0.98, 0.2, 1.5, 1000, "small-region probability threshold 1.5"),
        (0.98, 0.2, -0.1, 1000, "small-region probability threshold -0.1"),
        (0.98, 0.2, 0.9, -1, "small-region size threshold -1 must be a whole number of voxels >= 0"),
        (0.98, 0.2, 0.9, math.inf, "small-region size threshold inf"),
        (0.98, 0.2, 0.9, 2.5, "small-region size threshold 2.5"),
    ],
)
def test_bad_thresholds_are_refused_by_the_one_check(high, low, prob, size, message):
    """check_thresholds is the one owner: PostProcessing (what segment_block takes) and
    post_process call it."""
    for call in (
        lambda: check_thresholds(high, low, prob, size),
        lambda: PostProcessing(high, low, prob, size),
        lambda: post_process(np.zeros((2, 2, 2), np.float32), high, low, prob, size),
    ):
        with pytest.raises(ParameterError) as info:
            call()
        assert message in str(info.value)


def test_edge_thresholds_are_allowed():
    assert check_thresholds(1.0, 0.0, 0.0, 0) == (1.0, 0.0, 0.0, 0)
    assert check_thresholds(0.5, 0.5, 1.0, 10.0) == (0.5, 0.5, 1.0, 10)  # low == high; a whole float size
    PostProcessing(np.float32(0.98), np.float32(0.2), 0.9, np.int64(1000))


BAD_SEGMENT_NUMBERS = {
    "high threshold 2": ({"-ht": "2"}, "high threshold 2.0 must be a finite number in [0, 1]"),
    "low threshold -1": ({"-lt": "-1"}, "low threshold -1.0 must be a finite number in [0, 1]"),
    "high threshold nan": ({"-ht": "nan"}, "high threshold nan must be a finite number in [0, 1]"),
    "low above high": ({"-lt": "0.9", "-ht": "0.5"}, "low threshold 0.9 is above the high threshold 0.5"),
    "probability threshold inf": ({"--small_region_probability_threshold": "inf"}, "probability threshold inf"),
    "size -1": ({"--small_region_size_threshold": "-1"}, "size threshold -1 must be a whole number of voxels >= 0"),
    "factor 1e39 overflows float32": ({"--scaling": "1e39"}, "scaling factor 1e+39 cannot be used"),
    "factor 1e-50 underflows float32": ({"--scaling": "1e-50"}, "(this one becomes 0.0)"),
    "factor overflows float32 on uint16": ({"--scaling": "1e34"}, "uint16 input: its largest value 65535"),
    "factor the network overflows on": ({"--scaling": "1.5e32"}, "allowed: 1.175e-38 <= factor <= 1.526e+25"),
    "empty start": ({"--start": ""}, "--start '' is not 'x,y,z' with integer values"),
    "empty end": ({"--end": ""}, "--end '' is not 'x,y,z' with integer values"),
}


@pytest.mark.parametrize("case", list(BAD_SEGMENT_NUMBERS))
def test_bad_numbers_in_segment_volume(case, synthetic_n5, model_path, tmp_path):
    """Thresholds are checked with or without --with_post_processing (a wrong value is a mistake
    either way); nothing is written."""
    inp, _ = synthetic_n5
    out = tmp_path / "out.n5"
    create_volume(out, "seg/s0", (150, 140, 130), (32, 32, 32), "float32")
    before = tree_digest(out)
    over, message = BAD_SEGMENT_NUMBERS[case]
    proc = run_script("segment_volume.py", *host_args(inp, out, model_path, **over), "--with_post_processing", "--no-progress")
    assert_one_error(proc, message)
    assert tree_digest(out) == before


# ---- scaling factors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "factor, dtype, message",
    [
        (1e39, None, "this one becomes inf"),
        (1e-50, None, "this one becomes 0.0"),
        (1e-39, "uint8", "this one becomes"),  # a float32 subnormal: not a normal float32
        (1e34, "uint16", "65535 times the factor is inf, beyond the 1e+30 the model's float32 arithmetic takes"),
        # finite in float32 (9.8e36), but the network overflows to NaN on such input (measured): refused
        (1.5e32, "uint16", "allowed: 1.175e-38 <= factor <= 1.526e+25"),
        (1e30, "int32", "its largest value 2147483648"),
        (1e25, "uint16", None),
        (2e-38, "uint16", None),  # the smallest normal float32 is 1.18e-38
    ],
)
def test_factor_must_stay_in_float32_on_the_dtype_range(factor, dtype, message):
    if message is None:
        assert check_scaling_factor(factor, dtype) == factor
        return
    with pytest.raises(ScalingError, match="cannot be used") as info:
        check_scaling_factor(factor, dtype)
    assert message in str(info.value)


def test_float_input_factor_is_checked_on_the_values():
    """Float data can hold any magnitude: the scaled values are checked where a tile is read."""
    assert check_scaling_factor(1e30, "float32") == 1e30  # the dtype alone does not refuse it
    assert check_scaled_values(np.array([0.0, 1e3], np.float32), 1e26)
    with pytest.raises(ScalingError, match=r"its value 1e\+30 times the factor is inf, .* allowed here: factor <= 1$"):
        check_scaled_values(np.array([[-1e30, 2.0]], np.float32), 1e10)
    with pytest.raises(ScalingError, match=r"allowed here: factor <= 1e\+20"):
        check_scaled_values(np.array([1e10], np.float32), 1e21)  # finite, but beyond what the network takes
    assert not check_scaled_values(np.array([1.0, np.nan]), 1.0)
    assert not check_scaled_values(np.array([1.0, -np.inf], np.float16), 1.0)
    with pytest.raises(ScalingError, match="input value 4e\\+38 is beyond float32"):
        check_scaled_values(np.array([4e38], np.float64), 1e-20)  # float64 beyond float32: no factor helps
    assert check_scaled_values(np.array([65535], np.uint16), 1e30)  # integers are never looked at


def test_tile_choice_parameters():
    for kwargs, message in (
        ({"seed": -1}, "random seed -1 must be an integer >= 0"),
        ({"fraction": math.nan}, "fraction of tiles nan"),
        ({"fraction": -0.5}, "fraction of tiles -0.5"),
        ({"n_tiles": -2}, "number of tiles -2"),
    ):
        args = {"total": 10, "n_tiles": None, "fraction": 0.5, "seed": 1, **kwargs}
        with pytest.raises(ParameterError, match=message):
            choose_tiles(**args)


def test_seed_errors_are_one_line(synthetic_n5, tmp_path):
    inp, _ = synthetic_n5
    proc = run_script("scaling_factor.py", "-i", inp, "-d", "/c1/s0", "-n", "2", "--seed", "-1")
    assert_one_error(proc, "--seed", "greater than or equal to 0")
    proc = run_script("make_test_volume.py", "-o", tmp_path / "t.n5", "--seed", "-1")
    assert_one_error(proc, "--seed", "greater than or equal to 0")
    assert not (tmp_path / "t.n5").exists()
    proc = run_script("scaling_factor.py", "-i", inp, "-d", "/c1/s0", "-p", "nan")
    assert_one_error(proc, "--percent_tiles")
    for flag in ("--start", "--end"):
        proc = run_script("scaling_factor.py", "-i", inp, "-d", "/c1/s0", flag, "")
        assert_one_error(proc, f"{flag} '' is not 'x,y,z'")


# ---- non-finite input voxels ---------------------------------------------------------------


def float_volume(path, shape=(100, 100, 100), chunks=(32, 32, 32), bad=()):
    """A float32 input (x,y,z) of exponential-like intensities with ``bad`` voxels: ((x,y,z), value)."""
    data = (np.random.default_rng(0).exponential(200, shape) + 20).astype(np.float32)
    for xyz, value in bad:
        data[xyz] = value
    vol = create_volume(path, "raw", shape, chunks, "float32")
    vol.write_chunked_zyx(Box((0, 0, 0), shape), data.transpose(2, 1, 0))
    return vol


@pytest.mark.parametrize("kind", ["n5", "zarr"])
def test_non_finite_voxels_are_counted_with_the_first(kind, tmp_path):
    vol = float_volume(
        tmp_path / f"f.{kind}",
        shape=(40, 30, 20),
        chunks=(16, 16, 8),
        bad=(((33, 20, 12), np.inf), ((5, 25, 12), np.nan), ((1, 2, 15), -np.inf)),
    )
    for call in (lambda: vol.check_finite(vol.box), lambda: vol.check_finite(vol.box, io_executor(2)), lambda: vol.read_finite(vol.box)):
        with pytest.raises(InputValueError) as info:
            call()
        # the first in storage order: lowest z, then y, then x (both at z=12: y=20 before y=25)
        assert "holds 3 NaN or infinite voxels in [0,0,0 .. 40,30,20), the first at x,y,z 33,20,12" in str(info.value)
    with pytest.raises(InputValueError, match="holds 1 NaN or infinite voxel in"):
        vol.check_finite(Box((0, 0, 0), (8, 8, 16)))
    vol.check_finite(Box((0, 0, 0), (8, 8, 8)))  # clean part: no error
    assert vol.read_finite(Box((0, 0, 0), (8, 8, 8))).shape == (8, 8, 8)


def test_non_finite_input_in_the_scaling_factor(tmp_path):
    vol = float_volume(tmp_path / "f.n5", shape=(64, 64, 64), bad=(((40, 3, 50), np.nan),))
    proc = run_script("scaling_factor.py", "-i", vol.container, "-d", "/raw", "-n", "8", "--partition_size", "32", "--seed", "1")
    assert_one_error(proc, "holds 1 NaN or infinite voxel in [32,0,32 .. 64,32,64), the first at x,y,z 40,3,50")
    assert "Calculated a scaling factor" not in proc.stdout  # the host never reads a factor from it


def test_non_finite_and_overflowing_input_in_segmentation(model_path, tmp_path):
    """A NaN or inf in the block's read window (block plus model context) is an error naming how many
    and the first; the scaled values must stay finite (float input); nothing is written. Post-processing
    on a block warns once that it depends on the block cut, and not when the block is the whole image.
    Loads TensorFlow, runs no tile: the check fails on the first tile, read while the model loads."""
    vol = float_volume(
        tmp_path / "f.n5",
        bad=(((90, 90, 90), np.inf), ((95, 91, 90), np.nan), ((10, 90, 10), 1e30), ((5, 5, 5), np.nan)),
    )
    out = tmp_path / "o.n5"
    create_volume(out, "seg", vol.shape, (32, 32, 32), "float32")
    before = tree_digest(out)
    common = ["-i", vol.container, "-id", "raw", "-o", out, "-od", "seg", "-m", model_path,
              "--model_input_shape", "132,132,132", "--no-progress", "--with_post_processing"]
    proc = run_script("segment_volume.py", *common, "-s", SCALING, "--start", "64,64,64", "--end", "96,96,96")
    assert_one_error(proc, "holds 2 NaN or infinite voxels in [20,20,20 .. 100,100,100), the first at x,y,z 90,90,90")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: post-processing runs on this block alone: objects cut by the block's borders are "
                        "judged by their part inside it (hysteresis seeds, object sizes), so the result depends on how "
                        "the volume is cut into blocks"]
    # the window [-44,20,-44 .. 76,140,76) holds 1e30 and no NaN: 1e30 * 1e10 is inf in float32
    big = run_script("segment_volume.py", *common, "-s", "1e10", "--start", "0,64,0", "--end", "32,96,32")
    assert_one_error(big, "scaling factor 10000000000.0 cannot be used for this input: its value 1e+30 times the factor is inf")
    whole = run_script("segment_volume.py", *common, "-s", SCALING)
    assert_one_error(whole, "holds 3 NaN or infinite voxels in [0,0,0 .. 100,100,100), the first at x,y,z 5,5,5")
    assert "post-processing runs on this block alone" not in whole.stderr  # the whole image: no cut
    assert tree_digest(out) == before


def test_non_finite_voxels_outside_the_window_do_not_matter(model_path, tmp_path):
    """Voxels the block's output does not depend on are not judged: the block runs, its output is
    finite. Runs the model on one 132^3 tile."""
    vol = float_volume(tmp_path / "f.n5", bad=(((90, 90, 90), np.nan),))  # the window is [-44, 76)
    out = create_volume(tmp_path / "o.n5", "seg", vol.shape, (32, 32, 32), "float32")
    run_script(
        "segment_volume.py", "-i", vol.container, "-id", "raw", "-o", out.container, "-od", "seg", "-m", model_path,
        "-s", SCALING, "--start", "0,0,0", "--end", "32,32,32", "--model_input_shape", "132,132,132", "--no-progress",
        check=True,
    )
    result = open_volume(out.container, "seg").read(Box((0, 0, 0), (32, 32, 32)))
    assert np.isfinite(result).all() and (result > 0).all()
