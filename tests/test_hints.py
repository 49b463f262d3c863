"""Hints where newcomers go wrong (issue 14, item 5): each mistake gets one `error:` line (exit 2)
that says what was meant, or a warning where the run still makes sense."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_script

from exllsm_neuronseg.geometry import Box
from exllsm_neuronseg.volume import create_volume


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("hints") / "in.n5"
    vol = create_volume(path, "c1/s0", (64, 64, 32), (32, 32, 32), "uint16")
    data = np.random.default_rng(0).integers(20, 60, size=(32, 64, 64), dtype=np.uint16)
    vol.write_chunked_zyx(Box((0, 0, 0), (64, 64, 32)), data)
    return path


def one_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    return lines[0]


def test_a_container_path_that_includes_the_dataset_says_how_to_name_them(small):
    line = one_error(run_script("scaling_factor.py", "-i", small / "c1" / "s0", "-id", "/c1/s0", "-p", "0.5"))
    assert f"is the dataset /c1/s0 inside the container {small}" in line, line
    assert "give the container and the dataset path separately" in line


def test_scaling_factor_without_a_tile_count_or_fraction_is_an_error(small):
    line = one_error(run_script("scaling_factor.py", "-i", small, "-id", "/c1/s0"))
    assert "no sampling asked for" in line and "fraction" in line, line


def test_a_percentage_given_as_the_fraction_is_an_error(small):
    line = one_error(run_script("scaling_factor.py", "-i", small, "-id", "/c1/s0", "-p", "50"))
    assert "fraction of tiles 50.0 is above 1" in line and "not a percentage" in line, line


def test_too_small_a_fraction_warns_and_prints_the_null_factor_the_pipeline_expects(small):
    proc = run_script("scaling_factor.py", "-i", small, "-id", "/c1/s0", "-p", "0.01", "--partition_size", "32,32,32")
    assert proc.returncode == 0, proc.stderr
    assert "warning: 0.01 of 4 tiles is less than one tile" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1].split(" ")[5] == "null"


def test_the_original_and_the_common_dataset_flag_both_work(small):
    for flag in ("-d", "--data_set", "-id", "--input-dataset"):
        proc = run_script("scaling_factor.py", "-i", small, flag, "/c1/s0", "-n", "1", "--partition_size", "32,32,32", "--seed", "1")
        assert proc.returncode == 0, (flag, proc.stderr)
        assert proc.stdout.strip().splitlines()[-1].startswith("Calculated a scaling factor of "), proc.stdout


@pytest.mark.parametrize("value, fragment", [("null", "what the scaling step prints when none"), ("abc", "is not a number")])
def test_a_scaling_factor_pasted_from_a_failed_scaling_step_says_why(small, tmp_path, value, fragment):
    run_script("create_volume.py", "-i", small, "-id", "c1/s0", "-o", tmp_path / "out.n5", "-od", "seg/s0", check=True)
    line = one_error(run_script(
        "segment_volume.py", "-i", small, "-id", "c1/s0", "-o", tmp_path / "out.n5", "-od", "seg/s0",
        "-m", "unused.h5", "-s", value,
    ))
    assert fragment in line, line


def test_block_options_show_what_they_take():
    help_text = run_script("segment_volume.py", "--help").stdout
    assert "--start X,Y,Z" in help_text and "--blocks FILE" in help_text and "-s, --scaling FACTOR" in help_text
    assert "<list[str]>" not in help_text


@pytest.mark.parametrize(
    "script, names",
    [
        ("segment_volume.py", ["--tile-shape", "--model_input_shape", "-id, --input_data_set, --input-dataset"]),
        ("plan_blocks.py", ["--tile-shape", "--model_input_shape"]),
        ("prepare_dataset.py", ["--tile-shape", "--tile-input-shape", "--model_input_size", "--dataset-file", "--dataset-dir"]),
        ("train_unet.py", ["--tile-shape", "--model_input_size", "--dataset-file", "--training-dataset"]),
        ("evaluate_unet.py", ["--tile-shape", "--model_input_shape", "--dataset-file", "--dataset"]),
        ("scaling_factor.py", ["-id, -d, --input-dataset", "--data_set"]),
    ],
)
def test_one_name_per_thing_with_the_original_names_as_aliases(script, names):
    help_text = run_script(script, "--help").stdout
    for name in names:
        assert name in help_text, (script, name)


def test_a_sampling_stage_prints_the_seed_it_drew(small):
    proc = run_script("scaling_factor.py", "-i", small, "-id", "/c1/s0", "-n", "1", "--partition_size", "32,32,32")
    assert proc.returncode == 0, proc.stderr
    seed = int(proc.stdout.split("Random seed ")[1].split()[0])
    again = run_script("scaling_factor.py", "-i", small, "-id", "/c1/s0", "-n", "1", "--partition_size", "32,32,32", "--seed", str(seed))
    assert proc.stdout.strip().splitlines()[-1] == again.stdout.strip().splitlines()[-1]
