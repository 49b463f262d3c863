"""Provenance (issue 13, item 3): every dataset we write says what made it, from what, with which
code and settings; the record survives re-runs; derived datasets carry their source's record."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_script

from exllsm_neuronseg import __version__
from exllsm_neuronseg.provenance import ATTRIBUTE, describe, read_provenance
from exllsm_neuronseg.volume import open_volume

TILE = "108,108,108"


@pytest.fixture(scope="module")
def made(synthetic_n5, tmp_path_factory):
    """A probability dataset created by create_volume.py from the synthetic input."""
    inp, _ = synthetic_n5
    out = tmp_path_factory.mktemp("prov") / "out.n5"
    run_script("create_volume.py", "-i", inp, "-id", "c1/s0", "-o", out, "-od", "seg/s0", check=True)
    return inp, out


def segment(inp, out, model_path, scaling, start="0,0,0", end="64,64,64", *extra):
    return run_script(
        "segment_volume.py", "-i", inp, "-id", "c1/s0", "-o", out, "-od", "seg/s0", "-m", model_path,
        "-s", str(scaling), "--start", start, "--end", end, "--model_input_shape", TILE, "--no-progress", *extra,
        check=True,
    )


def test_a_created_dataset_records_what_made_it_and_from_what(made):
    inp, out = made
    record = open_volume(out, "seg/s0").array.attrs[ATTRIBUTE]
    assert record["stage"] == "create_volume" and record["version"] == __version__
    assert record["settings"] == {"dtype": "float32", "chunks": [32, 32, 32]}
    assert record["commit"] is None or len(record["commit"].split("-")[0]) == 40  # a checkout's commit
    source = record["source"]
    assert source["dataset"] == "/c1/s0" and source["container"] == str(inp.resolve())
    assert source["identity"] == json.loads(json.dumps(source["identity"]))  # plain JSON
    assert record["created"].endswith("Z")


def test_block_settings_are_recorded_grouped_and_survive_re_runs(made, model_path):
    inp, out = made
    segment(inp, out, model_path, 0.00045)
    segment(inp, out, model_path, 0.00045, "64,0,0", "128,64,64")
    first = read_provenance(open_volume(out, "seg/s0"))
    assert len(first["blocks"]) == 1
    group = first["blocks"][0]
    assert group["blocks"] == 2 and group["voxels"] == 2 * 64**3
    assert group["model_name"] == model_path.name
    assert group["settings"]["scaling"] == repr(0.00045) and group["settings"]["tile"] == [108, 108, 108]
    assert len(group["settings"]["model_sha256"]) == 64

    # a re-run skips the finished block and keeps its record
    proc = segment(inp, out, model_path, 0.00045)
    assert "already done" in proc.stdout
    assert read_provenance(open_volume(out, "seg/s0"))["blocks"] == first["blocks"]

    # another setting for one block: two groups, and the summary says the blocks differ
    segment(inp, out, model_path, 0.0005, "64,0,0", "128,64,64")
    now = read_provenance(open_volume(out, "seg/s0"))
    assert sorted(g["settings"]["scaling"] for g in now["blocks"]) == sorted([repr(0.00045), repr(0.0005)])
    text = describe(now)
    assert "warning: the blocks were made with 2 different settings" in text
    assert "made by create_volume" in text and f"exllsm-neuronseg {__version__}" in text


def test_the_command_prints_the_record(made):
    _, out = made
    proc = run_script("provenance.py", "-i", out, "-id", "seg/s0", check=True)
    assert proc.stdout.startswith(f"dataset {out.resolve()}:/seg/s0\nmade by create_volume")
    proc = run_script("provenance.py", "-i", out, "-id", "seg/s0", "--json", check=True)
    assert json.loads(proc.stdout)["creation"]["stage"] == "create_volume"
    bad = run_script("provenance.py", "-i", out, "-id", "nothing/here")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


def test_a_pyramid_level_carries_its_source_record(made, tmp_path):
    _, out = made
    proc = run_script("build_pyramid.py", "--help")
    assert proc.returncode == 0
    run_script("build_pyramid.py", "-i", out, "-id", "seg/s0", "--max-levels", "1", check=True)
    level = open_volume(out, "seg/s1").array.attrs[ATTRIBUTE]
    assert level["stage"] == "build_pyramid" and level["settings"]["level"] == "seg/s1"
    assert level["source"]["dataset"] == "/seg/s0"
    assert level["source"]["provenance"]["stage"] == "create_volume"  # the chain goes back to s0's maker
    text = describe(read_provenance(open_volume(out, "seg/s1")))
    assert "made by build_pyramid" in text and "  made by create_volume" in text


def test_a_dataset_without_a_record_says_so(tmp_path):
    from exllsm_neuronseg.volume import create_volume

    vol = create_volume(tmp_path / "other.n5", "x/s0", (8, 8, 8), (8, 8, 8), "uint8")
    vol.write_chunked_zyx(vol.box, np.ones((8, 8, 8), np.uint8))
    text = describe(read_provenance(vol))
    assert "no creation record" in text and "no finished blocks recorded" in text
