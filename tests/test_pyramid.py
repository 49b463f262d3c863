"""Multiscale pyramids (exllsm_neuronseg.pyramid, bin/build_pyramid.py): values, block cuts, factors,
attributes, label ids, re-runs and bad inputs."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import run_script
from exllsm_neuronseg import testhook
from exllsm_neuronseg.errors import GeometryError, OutputExistsError, ParameterError, VolumeError
from exllsm_neuronseg.geometry import Box
from exllsm_neuronseg.pyramid import (
    build_level_blocks,
    build_pyramid,
    create_levels,
    downsample,
    level_blocks,
    level_factors,
    open_level,
    plan_levels,
    plan_pyramid,
)
from exllsm_neuronseg.volume import create_volume, open_volume

RESOLUTION = {"dimensions": [0.104, 0.104, 0.18], "unit": "um"}


# ---- references: whole arrays, written independently of the library --------------------------


def reference(a: np.ndarray, factors_xyz, method: str) -> np.ndarray:
    """Downsample a z,y,x array by x,y,z factors the plain way."""
    f = tuple(factors_xyz)[::-1]
    if method == "nearest":
        return a[:: f[0], :: f[1], :: f[2]]
    out = tuple(-(-n // k) for n, k in zip(a.shape, f))
    if method in ("max", "mean"):
        padded = np.full(tuple(o * k for o, k in zip(out, f)), np.nan)
        padded[: a.shape[0], : a.shape[1], : a.shape[2]] = a
        blocks = padded.reshape(out[0], f[0], out[1], f[1], out[2], f[2])
        reduce = np.nanmax if method == "max" else np.nanmean
        return reduce(blocks, axis=(1, 3, 5)).astype(a.dtype)
    result = np.empty(out, dtype=a.dtype)
    for z, y, x in itertools.product(*(range(n) for n in out)):
        values = a[z * f[0] : (z + 1) * f[0], y * f[1] : (y + 1) * f[1], x * f[2] : (x + 1) * f[2]].ravel()
        counts = Counter(int(v) for v in values)
        result[z, y, x] = min(counts, key=lambda v: (-counts[v], v == 0, v))  # most, then nonzero, then smallest
    return result


def reference_pyramid(s0: np.ndarray, levels, method: str) -> list[np.ndarray]:
    out = [s0]
    for level in levels:
        out.append(reference(out[-1], level.relative, method))
    return out


def probabilities(shape_zyx, seed=0) -> np.ndarray:
    """Random float32 in [0, 1) (multiples of 2**-24: float64 sums of a few are exact), a third zero."""
    rng = np.random.default_rng(seed)
    data = rng.random(shape_zyx, dtype=np.float32)
    data[:, :, : shape_zyx[2] // 3] = 0
    return data


def labels(shape_zyx, seed=0, ids=(0, 0, 0, 7, 2**40 + 3, 2**63 + 11)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray(ids, dtype=np.uint64)[rng.integers(0, len(ids), shape_zyx)]


def write_s0(container, dataset, data_zyx, chunks, attributes=None) -> None:
    volume = create_volume(str(container), dataset, data_zyx.shape[::-1], chunks, data_zyx.dtype, attributes=attributes)
    volume.write_zyx((0, 0, 0), data_zyx)


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


# ---- downsampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("factors", [(2, 2, 2), (2, 2, 1), (1, 2, 2), (2, 1, 1)])
@pytest.mark.parametrize("shape", [(6, 8, 10), (5, 7, 9), (1, 3, 2)])
def test_downsample_equals_the_reference(factors, shape):
    floats = probabilities(shape, seed=sum(shape))
    for method in ("max", "mean"):
        np.testing.assert_array_equal(downsample(floats, factors, method), reference(floats, factors, method))
    ids = labels(shape, seed=sum(shape))
    for method in ("mode", "nearest"):
        np.testing.assert_array_equal(downsample(ids, factors, method), reference(ids, factors, method))
    assert downsample(floats, factors, "mean").dtype == np.float32 and downsample(ids, factors, "mode").dtype == np.uint64


def test_mode_ties_go_to_the_smallest_nonzero_id():
    block = lambda values: np.array(values, dtype=np.uint64).reshape(2, 2, 2)  # noqa: E731
    assert downsample(block([0, 0, 0, 0, 9, 9, 9, 9]), (2, 2, 2), "mode").item() == 9  # 4-4 with background
    assert downsample(block([0, 0, 0, 0, 0, 9, 9, 9]), (2, 2, 2), "mode").item() == 0  # background in majority
    assert downsample(block([5, 5, 3, 3, 0, 0, 8, 8]), (2, 2, 2), "mode").item() == 3  # 2-2-2-2: smallest nonzero
    assert downsample(block([0, 0, 0, 7, 7, 4, 4, 1]), (2, 2, 2), "mode").item() == 0  # 3 beats 2
    mask = np.array([1, 0, 0, 1, 0, 1, 1, 0], dtype=np.uint8).reshape(2, 2, 2)
    assert downsample(mask, (2, 2, 2), "mode").item() == 1  # a 4-4 mask keeps the object


def test_max_keeps_a_thin_neurite_mean_fades_it():
    data = np.zeros((16, 16, 16), np.float32)
    data[7, 7, :] = 1.0  # one voxel thick along x
    s1, s2 = downsample(data, (2, 2, 2), "max"), downsample(downsample(data, (2, 2, 2), "max"), (2, 2, 2), "max")
    assert s1.max() == s2.max() == 1.0
    m2 = downsample(downsample(data, (2, 2, 2), "mean"), (2, 2, 2), "mean")
    assert m2.max() == pytest.approx(1 / 16)


# ---- factors and levels ----------------------------------------------------------------------


def test_factors_isotropic_and_anisotropic():
    assert [level_factors(k) for k in (1, 2, 3)] == [(2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert [level_factors(k, (0.5, 0.5, 0.55)) for k in (1, 2)] == [(2, 2, 2), (4, 4, 4)]  # roughly isotropic
    ex = (0.104, 0.104, 0.18)  # the ExLLSM voxel: z waits one level
    assert [level_factors(k, ex) for k in (1, 2, 3, 4)] == [(2, 2, 1), (4, 4, 2), (8, 8, 4), (16, 16, 8)]
    assert [level_factors(k, (0.1, 0.1, 0.4)) for k in (1, 2, 3)] == [(2, 2, 1), (4, 4, 1), (8, 8, 2)]
    assert [level_factors(k, (0.4, 0.1, 0.1)) for k in (1, 2, 3)] == [(1, 2, 2), (1, 4, 4), (2, 8, 8)]
    for k in range(1, 8):  # each level halves the voxel the most along its finest axes, never more than 2x
        before, now = level_factors(k - 1, ex), level_factors(k, ex)
        assert all(n // b in (1, 2) and n % b == 0 for n, b in zip(now, before))
        size = [r * f for r, f in zip(ex, now)]
        assert max(size) / min(size) < 1.75


def test_levels_stop_at_one_chunk_or_the_maximum():
    levels = plan_levels((1000, 1000, 600), (128, 128, 64), (0.104, 0.104, 0.18), group="seg")
    assert [lv.dataset for lv in levels] == ["seg/s1", "seg/s2", "seg/s3", "seg/s4", "seg/s5"]
    assert [lv.shape for lv in levels] == [(500, 500, 600), (250, 250, 300), (125, 125, 150), (63, 63, 75), (32, 32, 38)]
    assert all(lv.shape == tuple(-(-n // f) for n, f in zip((1000, 1000, 600), lv.factors)) for lv in levels)  # ceil
    assert levels[-1].shape <= (128, 128, 64) and not all(n <= c for n, c in zip(levels[-2].shape, (128, 128, 64)))
    assert len(plan_levels((1000, 1000, 600), (128, 128, 64), max_levels=2)) == 2
    assert plan_levels((100, 100, 100), (128, 128, 128)) == ()  # s0 fits in one chunk already
    with pytest.raises(ParameterError, match="1..32"):
        plan_levels((100, 100, 100), (8, 8, 8), max_levels=0)


# ---- whole pyramids: any block cut gives the reference -----------------------------------------


CASES = {
    # name: (data, chunks, s0 attributes, method)
    "probabilities max, anisotropic": (probabilities((29, 38, 45)), (8, 8, 8), {"pixelResolution": RESOLUTION}, "max"),
    "probabilities mean, isotropic": (probabilities((29, 38, 45), 1), (8, 8, 8), None, "mean"),
    "labels mode, odd chunks": (labels((21, 30, 27)), (7, 6, 5), None, "mode"),
    "labels nearest": (labels((21, 30, 27), 2), (8, 8, 8), {"resolution": [1, 1, 2]}, "nearest"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("container", ["out.n5", "out.zarr"])
def test_any_block_cut_gives_the_reference(case, container, tmp_path):
    data, chunks, attributes, method = CASES[case]
    reference_levels = None
    for cut, (partition, seed) in enumerate([(8, 1), (16, 2), ((24, 8, 40), 3)]):
        root = tmp_path / str(cut) / container
        write_s0(root, "seg/s0", data, chunks, attributes)
        pyramid = plan_pyramid(open_volume(str(root), "seg/s0"), method)
        assert pyramid.levels and pyramid.method == method
        create_levels(pyramid)
        rng = np.random.default_rng(seed)
        for level in pyramid.levels:  # the blocks of a level in random order, as parallel tasks would finish
            pair = open_level(str(root), "/seg/s0", level.index)
            blocks = list(level_blocks(level, partition).blocks)
            for i in rng.permutation(len(blocks)):
                build_level_blocks(pair, [blocks[i]], method, io_threads=2)
        if reference_levels is None:
            reference_levels = reference_pyramid(data, pyramid.levels, method)
            assert len(reference_levels) == len(pyramid.levels) + 1
        for level, expected in zip(pyramid.levels, reference_levels[1:]):
            got = open_volume(str(root), level.dataset).read_zyx(Box((0, 0, 0), level.shape))
            np.testing.assert_array_equal(got, expected, err_msg=f"{case}, cut {cut}, {level.name}")
            assert got.dtype == data.dtype


def test_all_zero_chunks_are_not_stored(tmp_path):
    data = probabilities((16, 16, 48))  # x < 16 is zero: s1's first chunk of 8 along x is all zero
    write_s0(tmp_path / "o.n5", "s0", data, (8, 8, 8))
    results = build_pyramid(plan_pyramid(open_volume(str(tmp_path / "o.n5"), "s0")), partition_size=8)
    s1 = open_volume(str(tmp_path / "o.n5"), "s1")
    assert s1.shape == (24, 8, 8) and not s1.chunk_file((0, 0, 0)).exists() and s1.chunk_file((1, 0, 0)).exists()
    assert results[0].chunks == 1 and results[0].written == 0 and results[1].written == 1


# ---- attributes --------------------------------------------------------------------------------


def test_attributes_for_n5_viewers(tmp_path):
    n5 = tmp_path / "o.n5"
    write_s0(n5, "seg/s0", probabilities((40, 64, 64)), (16, 16, 16), {"pixelResolution": RESOLUTION, "offset": [1, 2, 3]})
    pyramid = plan_pyramid(open_volume(str(n5), "seg/s0"))
    create_levels(pyramid)
    group = json.loads((n5 / "seg" / "attributes.json").read_text())
    assert group["multiScale"] is True and group["axes"] == ["x", "y", "z"]
    assert group["scales"] == [[1, 1, 1], [2, 2, 1], [4, 4, 2], [8, 8, 4]]
    assert group["pixelResolution"] == RESOLUTION and group["resolution"] == [0.104, 0.104, 0.18]
    assert group["units"] == ["um"] * 3
    # every s<k> is listed, consecutively (n5-viewer takes s0..sN as the levels)
    assert sorted(p.name for p in (n5 / "seg").iterdir() if p.is_dir()) == ["s0", "s1", "s2", "s3"]
    for k, factors in enumerate(group["scales"][1:], 1):
        attrs = json.loads((n5 / "seg" / f"s{k}" / "attributes.json").read_text())
        assert attrs["downsamplingFactors"] == factors  # absolute, x,y,z
        # s0's resolution, unchanged: readers multiply it by the factors for the level's voxel size
        assert attrs["pixelResolution"] == RESOLUTION and attrs["offset"] == [1, 2, 3]
        voxel = [r * f for r, f in zip(attrs["pixelResolution"]["dimensions"], attrs["downsamplingFactors"])]
        assert voxel == pytest.approx([0.104 * factors[0], 0.104 * factors[1], 0.18 * factors[2]])
        assert attrs["dimensions"] == [-(-n // f) for n, f in zip((64, 64, 40), factors)]
        assert attrs["blockSize"] == [16, 16, 16] and attrs["dataType"] == "float32"
        assert attrs["compression"] == {"type": "gzip", "level": 1, "useZlib": False}
    s0 = json.loads((n5 / "seg" / "s0" / "attributes.json").read_text())
    assert "downsamplingFactors" not in s0  # s0 is never rewritten


def test_voxel_size_given_or_recorded(tmp_path):
    n5 = tmp_path / "o.n5"
    write_s0(n5, "a/s0", labels((16, 32, 32)), (8, 8, 8))
    warnings = []
    pyramid = plan_pyramid(open_volume(str(n5), "a/s0"), resolution="0.2,0.2,0.4", warn=warnings.append)
    assert pyramid.resolution == (0.2, 0.2, 0.4) and pyramid.unit == "um" and not warnings
    assert [lv.factors for lv in pyramid.levels][:2] == [(2, 2, 1), (4, 4, 2)]
    create_levels(pyramid)
    attrs = json.loads((n5 / "a" / "s1" / "attributes.json").read_text())
    assert attrs["pixelResolution"] == {"dimensions": [0.2, 0.2, 0.4], "unit": "um"}
    # s0's own voxel size wins over a different one given (the host always passes its resolution param)
    write_s0(n5, "b/s0", labels((16, 32, 32)), (8, 8, 8), {"pixelResolution": RESOLUTION})
    pyramid = plan_pyramid(open_volume(str(n5), "b/s0"), resolution="1,1,1", warn=warnings.append)
    assert pyramid.resolution == (0.104, 0.104, 0.18) and len(warnings) == 1 and "ignored" in warnings[0]
    # no voxel size anywhere: every axis halved, no resolution attributes invented
    write_s0(n5, "c/s0", labels((16, 32, 32)), (8, 8, 8))
    pyramid = plan_pyramid(open_volume(str(n5), "c/s0"))
    assert pyramid.resolution is None and pyramid.levels[0].factors == (2, 2, 2)
    create_levels(pyramid)
    assert "pixelResolution" not in json.loads((n5 / "c" / "s1" / "attributes.json").read_text())
    assert "pixelResolution" not in json.loads((n5 / "c" / "attributes.json").read_text())


# ---- labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mode", "nearest"])
def test_label_ids_are_never_averaged(method, tmp_path):
    rng = np.random.default_rng(5)
    data = np.zeros((33, 35, 37), np.uint64)
    for _ in range(40):  # boxes of big ids: an average of two would be an id that exists nowhere
        z, y, x = rng.integers(0, 30, 3)
        data[z : z + rng.integers(1, 6), y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = rng.integers(2**50, 2**63)
    write_s0(tmp_path / "l.n5", "connected/s0", data, (8, 8, 8))
    pyramid = plan_pyramid(open_volume(str(tmp_path / "l.n5"), "connected/s0"), method)
    build_pyramid(pyramid, partition_size=16)
    ids = set(np.unique(data).tolist())
    for level in pyramid.levels:
        got = open_volume(str(tmp_path / "l.n5"), level.dataset).read_zyx(Box((0, 0, 0), level.shape))
        assert set(np.unique(got).tolist()) <= ids, level.name
    mask = (data > 0).astype(np.uint8)
    write_s0(tmp_path / "m.n5", "mask/s0", mask, (8, 8, 8))
    pyramid = plan_pyramid(open_volume(str(tmp_path / "m.n5"), "mask/s0"))
    build_pyramid(pyramid, partition_size=16)
    top = open_volume(str(tmp_path / "m.n5"), pyramid.levels[-1].dataset)
    assert set(np.unique(top.read_zyx(top.box)).tolist()) <= {0, 1}


# ---- re-runs ---------------------------------------------------------------------------------------


def test_reruns_skip_until_the_source_changes(tmp_path):
    n5 = tmp_path / "o.n5"
    data = probabilities((32, 32, 32))
    write_s0(n5, "seg/s0", data, (8, 8, 8))
    pyramid = plan_pyramid(open_volume(str(n5), "seg/s0"), max_levels=2)
    first = build_pyramid(pyramid, partition_size=8)
    assert len(first) == 8 + 1 and not any(r.skipped for r in first)
    again = build_pyramid(pyramid, partition_size=8)
    assert all(r.skipped for r in again)
    # part of s0 is segmented again: exactly the blocks above it recompute, level by level
    s0 = open_volume(str(n5), "seg/s0", mode="r+")
    data[:8, :8, :8] = 0.75
    s0.write_zyx((0, 0, 0), data[:8, :8, :8])
    third = build_pyramid(pyramid, partition_size=8)
    assert [(r.level, r.block.start) for r in third if not r.skipped] == [(1, (0, 0, 0)), (2, (0, 0, 0))]
    expected = reference_pyramid(data, pyramid.levels, "max")
    for level, want in zip(pyramid.levels, expected[1:]):
        np.testing.assert_array_equal(open_volume(str(n5), level.dataset).read_zyx(Box((0, 0, 0), level.shape)), want)


def test_a_killed_block_is_computed_again(tmp_path, monkeypatch):
    n5 = tmp_path / "o.n5"
    write_s0(n5, "s0", probabilities((16, 16, 16)), (8, 8, 8))
    pyramid = plan_pyramid(open_volume(str(n5), "s0"), max_levels=1)
    create_levels(pyramid)
    pair = open_level(str(n5), "s0", 1)

    def killed(moment):
        if moment == "pyramid:block-written":
            raise KeyboardInterrupt

    monkeypatch.setattr(testhook, "checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        build_level_blocks(pair, [Box((0, 0, 0), (8, 8, 8))])
    monkeypatch.undo()
    assert not (n5 / "s1" / ".exllsm-done").is_dir() or not any((n5 / "s1" / ".exllsm-done").iterdir())
    result = build_level_blocks(pair, [Box((0, 0, 0), (8, 8, 8))])
    assert not result[0].skipped and build_level_blocks(pair, [Box((0, 0, 0), (8, 8, 8))])[0].skipped


def test_levels_that_differ_are_kept_only_on_request(tmp_path):
    n5 = tmp_path / "o.n5"
    write_s0(n5, "seg/s0", probabilities((32, 32, 32)), (8, 8, 8))
    pyramid = plan_pyramid(open_volume(str(n5), "seg/s0"))
    create_levels(pyramid)
    create_volume(str(n5), "seg/s9", (4, 4, 4), (4, 4, 4), "float32")  # beyond the plan
    before = tree(n5)
    with pytest.raises(OutputExistsError, match="s9 beyond the 2 levels"):
        create_levels(pyramid)
    assert tree(n5) == before
    create_levels(pyramid, overwrite=True)
    assert not (n5 / "seg" / "s9").exists()
    create_volume(str(n5), "seg/s1", (3, 3, 3), (8, 8, 8), "float32", overwrite=True)
    before = tree(n5)
    with pytest.raises(OutputExistsError, match="not the planned 16,16,16"):
        create_levels(pyramid)
    assert tree(n5) == before
    assert open_volume(str(create_levels(pyramid, overwrite=True)[0].container), "seg/s1").shape == (16, 16, 16)


# ---- the command line ------------------------------------------------------------------------------


def test_cli_two_steps(tmp_path):
    n5 = tmp_path / "o.n5"
    data = labels((20, 24, 28))
    write_s0(n5, "connected/s0", data, (8, 8, 8))
    plans = tmp_path / "plans"
    proc = run_script(
        "build_pyramid.py", "-i", n5, "-id", "/connected/s0", "--create-only", "--plans-dir", plans,
        "--partition-size", "8", "--resolution", "0.104,0.104,0.18", check=True,
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{n5}:/connected/s1: shape 14,12,20, factors 2,2,1 (from s0 by 2,2,1), 12 blocks -> {plans}/s1.txt"
    assert sorted(p.name for p in plans.iterdir()) == ["s1.txt", "s2.txt", "s3.txt"]
    assert (plans / "s1.txt").read_text().splitlines()[:2] == ["0,0,0,8,8,8", "8,0,0,14,8,8"]
    for k in (1, 2, 3):  # the tasks of a level, then the next level
        for half in ("0-5", "6-11") if k == 1 else ("all",):
            out = run_script("build_pyramid.py", "-i", n5, "-id", "/connected/s0", "--level", k, "--blocks", plans / f"s{k}.txt",
                             "--block-index", half, check=True).stdout.splitlines()
            blocks = len((plans / f"s{k}.txt").read_text().splitlines())
            shown = 6 if k == 1 else blocks
            assert len(out) == shown + (shown > 1) and all(line.startswith(f"s{k} block [") for line in out[:shown])
    levels = plan_pyramid(open_volume(str(n5), "connected/s0"), resolution=(0.104, 0.104, 0.18)).levels
    expected = reference_pyramid(data, levels, "mode")
    for level, want in zip(levels, expected[1:]):
        np.testing.assert_array_equal(open_volume(str(n5), level.dataset).read_zyx(Box((0, 0, 0), level.shape)), want)
    again = run_script("build_pyramid.py", "-i", n5, "-id", "/connected/s0", "--level", 2, "--start", "0,0,0", "--end", "7,6,8", check=True)
    assert again.stdout.strip() == "s2 block [0,0,0 .. 7,6,8): already done (marker present, source unchanged), skipped"


def test_cli_one_process(tmp_path):
    n5 = tmp_path / "o.n5"
    write_s0(n5, "seg/s0", probabilities((20, 24, 28)), (8, 8, 8))
    proc = run_script("build_pyramid.py", "-i", n5, "-id", "seg/s0", "--method", "mean", check=True)
    assert proc.stdout.splitlines()[-1].startswith("2 levels (mean): 2 blocks: 2 computed, 0 already done")


BAD = {
    "not named s0": (["-id", "/seg/full"], "is not named s0"),
    "averaging labels": (["-id", "/lab/s0", "--method", "mean"], "does not apply to labels and masks (uint64"),
    "max of labels": (["-id", "/lab/s0", "--method", "max", "--level", "1"], "does not apply to labels"),
    "mode of probabilities": (["--method", "mode"], "does not apply to probabilities (float32)"),
    "bad voxel size": (["--resolution", "0.1,0,0.2"], "must be 3 finite numbers > 0"),
    "voxel size not numbers": (["--resolution", "a,b,c"], "numeric values"),
    "no levels": (["--max-levels", "0"], "must be in 1..32"),
    "level not created": (["--level", "1"], "create the pyramid's levels first"),
    "level 0": (["--level", "0"], "levels are 1, 2"),
    "two steps at once": (["--create-only", "--level", "1"], "two steps"),
    "blocks without a level": (["--start", "0,0,0", "--end", "8,8,8"], "give --level too"),
    "missing dataset": (["-id", "/nothing/s0"], "does not exist"),
    "bad partition": (["--partition-size", "0"], ">= 1"),
    "plans without create": (["--plans-dir", "p"], "--create-only"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_one_line_and_write_nothing(case, tmp_path):
    n5 = tmp_path / "o.n5"
    write_s0(n5, "seg/s0", probabilities((20, 24, 28)), (8, 8, 8))
    write_s0(n5, "seg/full", probabilities((4, 4, 4)), (8, 8, 8))
    write_s0(n5, "lab/s0", labels((20, 24, 28)), (8, 8, 8))
    if case == "max of labels":
        create_levels(plan_pyramid(open_volume(str(n5), "lab/s0")))
    args, message = BAD[case]
    before = tree(tmp_path)
    proc = run_script("build_pyramid.py", "-i", n5, *(["-id", "/seg/s0"] if "-id" not in args else []), *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (case, proc.stderr)
    assert message in lines[0], (case, lines[0])
    assert tree(tmp_path) == before, case


def test_library_errors_name_the_value(tmp_path):
    n5 = tmp_path / "o.n5"
    write_s0(n5, "s0", probabilities((20, 24, 28)), (8, 8, 8))
    with pytest.raises(GeometryError, match=r"'1,2' must be 3"):
        plan_pyramid(open_volume(str(n5), "s0"), resolution="1,2")
    with pytest.raises(VolumeError, match="is not named s0"):
        open_level(str(n5), "/x", 1)
    create_levels(plan_pyramid(open_volume(str(n5), "s0")))
    pair = open_level(str(n5), "s0", 1)
    with pytest.raises(GeometryError, match="not aligned to the output chunk grid 8,8,8"):
        build_level_blocks(pair, [Box((0, 0, 0), (5, 8, 8))])
    assert not any(p.name.isdigit() for p in (n5 / "s1").iterdir())
    os.remove(n5 / "s1" / "attributes.json")
    with pytest.raises(VolumeError):
        open_level(str(n5), "s0", 1)
