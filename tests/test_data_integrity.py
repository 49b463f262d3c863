"""No silent data loss (issue 9): done markers vouch only for data that is still there.

Creation identities, replacements killed between their steps, an output replaced or removed while a
block runs, overlapping blocks with other settings, markers keyed on what the input really is, and
the lock that keeps unaligned jobs apart. Kills and pauses happen at named moments
(:mod:`exllsm_neuronseg.testhook`), never after a delay.

The fault-injection cases of issue 9 and where each is reproduced:

- case 1, ``--overwrite`` while a block runs: ``test_create_volume_overwrite_while_a_block_runs``;
- case 2, the output removed or recreated mid-run: ``test_output_removed_while_a_block_runs``,
  ``test_output_replaced_while_a_block_runs``;
- case 3, a kill during ``--overwrite``: ``test_a_replacement_killed_between_its_steps``,
  ``test_a_killed_creation_leaves_nothing_at_the_target``;
- case 4, overlapping blocks with other settings: ``test_overlapping_blocks_with_other_settings``;
- case 5, output = input: ``tests/test_cli.py::test_output_that_is_the_input_is_refused``,
  ``tests/test_create_volume.py::test_outputs_that_would_destroy_data_are_refused``;
- non-finite input, factors and thresholds out of range: ``tests/test_bad_numbers.py``;
- truncated and garbage chunks, full and read-only filesystems, leftover ``.partial`` files:
  ``tests/test_bad_files.py``; a full disk at the marker write: here.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, SCALING, run_script

from exllsm_neuronseg import testhook
from exllsm_neuronseg.errors import OutputError
from exllsm_neuronseg.geometry import Box
from exllsm_neuronseg.segment import (
    DONE_DIR,
    block_is_done,
    invalidate_overlapping_markers,
    mark_block_done,
    marker_path,
    segment_block,
    unaligned_lock,
)
from exllsm_neuronseg.volume import IDENTITY_ATTRIBUTE, create_volume, creation_identity, dataset_identity, open_volume

TILE = dict(input_shape=(132, 132, 132), output_shape=(44, 44, 44))
SHAPE = (48, 48, 32)  # x,y,z; chunks 16^3


def synthetic(path: Path, seed: int) -> Path:
    from exllsm_neuronseg.synthetic import SyntheticSpec, write_synthetic_n5

    write_synthetic_n5(str(path), "c1/s0", SyntheticSpec(shape=SHAPE, n_tubes=2, n_puncta=4, seed=seed), chunks=(16, 16, 16))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 48 x 48 x 32 synthetic volume with 16^3 chunks."""
    return open_volume(synthetic(tmp_path_factory.mktemp("tiny") / "in.n5", seed=7), "c1/s0")


def new_output(tmp_path: Path, like, dtype: str = "float32"):
    return create_volume(tmp_path / "out.n5", "seg/s0", like.shape, like.chunks, dtype)


def one_error_line(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def at(moment: str, action):
    """A replacement for testhook.checkpoint that calls ``action`` at ``moment`` (once)."""
    calls = []

    def checkpoint(name: str) -> None:
        if name == moment and not calls:
            calls.append(name)
            action()

    checkpoint.calls = calls  # type: ignore[attr-defined]
    return checkpoint


def wait_until_reached(folder: Path, moment: str, proc: subprocess.Popen) -> None:
    """Wait until ``proc`` stands at ``moment`` (an event: the file its hook creates), or fail if it ended."""
    while not (folder / f"{moment}.reached").exists():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended ({proc.returncode}) before {moment}: {proc.stderr.read()}")
        time.sleep(0.01)


def start_paused(args: list, folder: Path, moment: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", testhook.ENV: f"{moment}=pause:{folder}"}
    proc = subprocess.Popen(
        [sys.executable, str(BIN / "segment_volume.py"), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    wait_until_reached(folder, moment, proc)
    return proc


def resume(proc: subprocess.Popen, folder: Path, moment: str) -> subprocess.CompletedProcess:
    (folder / f"{moment}.go").touch()
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --------------------------------------------------------------------------------------------
# 1. Creation identities and replacements
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["n5", "zarr"])
def test_every_created_dataset_has_a_new_identity(tmp_path, suffix):
    """New on every create and replacement; kept with the dataset; added to one that has none."""
    container = tmp_path / f"o.{suffix}"
    first = create_volume(container, "seg/s0", (16, 16, 16), (8, 8, 8), "float32")
    identity = creation_identity(first.path)
    assert identity and len(identity) == 32
    kept = create_volume(container, "seg/s0", (16, 16, 16), (8, 8, 8), "float32", overwrite=True)
    assert creation_identity(kept.path) == identity
    replaced = create_volume(container, "seg/s0", (16, 16, 16), (8, 8, 8), "uint8", overwrite=True)
    assert creation_identity(replaced.path) not in (None, identity)
    other = create_volume(container, "seg/s1", (16, 16, 16), (8, 8, 8), "uint8")
    assert creation_identity(other.path) not in (None, identity, creation_identity(replaced.path))
    # one made without an identity (an older version, another tool) keeps its data and gets one
    other.write_zyx((0, 0, 0), np.ones((8, 8, 8), np.uint8))
    del other.array.attrs[IDENTITY_ATTRIBUTE]
    assert creation_identity(other.path) is None
    again = create_volume(container, "seg/s1", (16, 16, 16), (8, 8, 8), "uint8")
    assert creation_identity(again.path) is not None and again.read(again.box).sum() == 512
    assert sorted(p.name for p in (container / "seg").iterdir() if p.is_dir()) == ["s0", "s1"]


def test_a_killed_creation_leaves_nothing_at_the_target(tmp_path):
    """A dataset is complete (identity included) before it appears at its path; the temporary a
    killed creation left is discarded by the next one."""
    proc = run_script(
        "create_volume.py", "-i", synthetic(tmp_path / "in.n5", 1), "-id", "c1/s0", "-o", tmp_path / "o.n5", "-od", "seg/s0",
        env={testhook.ENV: "create:temporary-complete=kill"},
    )
    assert proc.returncode == -9, proc.stderr
    assert not (tmp_path / "o.n5" / "seg" / "s0").exists()
    (leftover,) = (p for p in (tmp_path / "o.n5" / "seg").iterdir() if p.is_dir())
    assert leftover.name.startswith(".s0.creating-") and creation_identity(leftover)
    run_script("create_volume.py", "-i", tmp_path / "in.n5", "-id", "c1/s0", "-o", tmp_path / "o.n5", "-od", "seg/s0", check=True)
    assert [p.name for p in (tmp_path / "o.n5" / "seg").iterdir() if p.is_dir()] == ["s0"]


@pytest.mark.parametrize(
    "moment, left",
    [
        ("create:temporary-complete", "old"),  # the new dataset is complete beside the old one
        ("create:old-moved-away", "none"),  # the old one left its path in one rename
        ("create:new-in-place", "new"),  # the new one is in place, the old one not yet deleted
    ],
)
def test_a_replacement_killed_between_its_steps(tmp_path, moment, left):
    """create_volume.py --overwrite SIGKILLed between each two steps leaves the old dataset whole
    (attributes, chunks, markers, identity), no dataset, or the new one complete without markers;
    the next run finishes the job and removes what the killed one left beside it."""
    template = synthetic(tmp_path / "in.n5", 1)
    old = create_volume(tmp_path / "o.n5", "seg/s0", SHAPE, (16, 16, 16), "float32")
    old.write_zyx((0, 0, 0), np.full((16, 16, 16), 0.5, np.float32))
    mark_block_done(old, Box((0, 0, 0), (16, 16, 16)), "f", creation_identity(old.path), {})
    old_identity = creation_identity(old.path)
    args = ["-i", template, "-id", "c1/s0", "-o", tmp_path / "o.n5", "-od", "seg/s0", "--as_binary_mask", "--overwrite"]
    proc = run_script("create_volume.py", *args, env={testhook.ENV: f"{moment}=kill"})
    assert proc.returncode == -9, proc.stderr
    target = tmp_path / "o.n5" / "seg" / "s0"
    if left == "old":
        vol = open_volume(tmp_path / "o.n5", "seg/s0")
        assert vol.dtype == np.float32 and creation_identity(target) == old_identity
        assert vol.read(vol.box).sum() == 0.5 * 16**3 and block_is_done(vol, Box((0, 0, 0), (16, 16, 16)), "f")
    elif left == "none":
        assert not target.exists()
    else:
        vol = open_volume(tmp_path / "o.n5", "seg/s0")
        assert vol.dtype == np.uint8 and creation_identity(target) not in (None, old_identity)
        assert vol.read(vol.box).sum() == 0 and not (target / DONE_DIR).exists()
    run_script("create_volume.py", *args, check=True)
    vol = open_volume(tmp_path / "o.n5", "seg/s0")
    assert vol.dtype == np.uint8 and vol.read(vol.box).sum() == 0 and not (target / DONE_DIR).exists()
    assert [p.name for p in (tmp_path / "o.n5" / "seg").iterdir() if p.is_dir()] == ["s0"]


def test_a_folder_that_is_not_a_dataset_is_never_replaced(tmp_path):
    (tmp_path / "o.n5" / "seg" / "s0" / "0").mkdir(parents=True)  # e.g. chunks without attributes
    with pytest.raises(OutputError, match="exists and is not a dataset"):
        create_volume(tmp_path / "o.n5", "seg/s0", (16, 16, 16), (8, 8, 8), "uint8", overwrite=True)
    assert (tmp_path / "o.n5" / "seg" / "s0" / "0").is_dir()


# --------------------------------------------------------------------------------------------
# Markers: identity, overlaps, failures at the marker write (no model needed)
# --------------------------------------------------------------------------------------------


def test_a_marker_counts_only_for_the_dataset_it_was_written_in(tmp_path):
    out = create_volume(tmp_path / "o.n5", "seg/s0", (32, 32, 32), (16, 16, 16), "float32")
    box = Box((0, 0, 0), (16, 16, 16))
    mark_block_done(out, box, "f", creation_identity(out.path), {})
    assert block_is_done(out, box, "f") and not block_is_done(out, box, "g")
    saved = marker_path(out, box).read_text()
    fresh = create_volume(tmp_path / "o.n5", "seg/s0", (32, 32, 32), (16, 16, 16), "uint8", overwrite=True)
    assert not marker_path(fresh, box).exists()  # markers leave with the dataset they are in
    marker_path(fresh, box).parent.mkdir()
    marker_path(fresh, box).write_text(saved)  # even copied over, it vouches for the old dataset only
    assert not block_is_done(fresh, box, "f")
    with pytest.raises(OutputError, match="was replaced"):
        mark_block_done(fresh, box, "f", json.loads(saved)["output_identity"], {})


def test_overlapping_markers_are_removed(tmp_path):
    out = create_volume(tmp_path / "o.n5", "seg/s0", (64, 64, 64), (16, 16, 16), "float32")
    identity = creation_identity(out.path)
    boxes = [Box((0, 0, 0), (64, 64, 64)), Box((0, 0, 0), (16, 16, 16)), Box((16, 0, 0), (32, 16, 16)), Box((32, 32, 32), (64, 64, 64))]
    for box in boxes:
        mark_block_done(out, box, "f", identity, {})
    (out.path / DONE_DIR / "16_0_0-32_16_16.json.partial").write_text("")  # a killed marker write
    (out.path / DONE_DIR / "notes.txt").write_text("kept")
    others = invalidate_overlapping_markers(out, Box((0, 0, 0), (16, 16, 16)))
    assert others == [boxes[0]]  # its own marker goes too, but is not reported
    assert sorted(p.name for p in (out.path / DONE_DIR).iterdir()) == [
        "16_0_0-32_16_16.json", "16_0_0-32_16_16.json.partial", "32_32_32-64_64_64.json", "notes.txt"
    ]
    assert invalidate_overlapping_markers(out, Box((16, 0, 0), (48, 16, 16))) == [boxes[2]]  # touching is not overlapping
    assert sorted(p.name for p in (out.path / DONE_DIR).iterdir()) == ["32_32_32-64_64_64.json", "notes.txt"]


def test_a_full_disk_at_the_marker_write_leaves_no_partial_marker(tmp_path, monkeypatch):
    out = create_volume(tmp_path / "o.n5", "seg/s0", (32, 32, 32), (16, 16, 16), "float32")
    box = Box((0, 0, 0), (16, 16, 16))
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        real(self, text[:10], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match="cannot write the done marker of block .*No space left on device"):
        mark_block_done(out, box, "f", creation_identity(out.path), {})
    monkeypatch.undo()
    assert list((out.path / DONE_DIR).iterdir()) == []


def test_the_input_record_follows_the_data_not_the_typed_path(tmp_path, monkeypatch):
    """Resolved container path and creation identity; without an identity, a digest of the metadata
    and its modification time."""
    vol = create_volume(tmp_path / "a" / "in.n5", "c1/s0", (16, 16, 16), (8, 8, 8), "uint16")
    monkeypatch.chdir(tmp_path / "a")
    record = dataset_identity(open_volume("in.n5", "/c1/s0/"))
    assert record == {"container": str((tmp_path / "a" / "in.n5").resolve()), "dataset": "c1/s0", "identity": creation_identity(vol.path)}
    del vol.array.attrs[IDENTITY_ATTRIBUTE]
    plain = dataset_identity(vol)
    assert set(plain) == {"container", "dataset", "attributes", "mtime_ns"} and plain == dataset_identity(vol)
    metadata = vol.path / "attributes.json"
    os.utime(metadata, ns=(metadata.stat().st_atime_ns, plain["mtime_ns"] + 10**9))  # rewritten later
    assert dataset_identity(vol)["mtime_ns"] != plain["mtime_ns"]
    assert dataset_identity(vol)["attributes"] == plain["attributes"]


# --------------------------------------------------------------------------------------------
# Blocks (tiny volume, 132^3 tiles)
# --------------------------------------------------------------------------------------------


def segment(source, out, start, end, scaling=SCALING, **kwargs):
    return segment_block(source, out, kwargs.pop("model"), start, end, scaling=scaling, **TILE, **kwargs)


def test_overlapping_blocks_with_other_settings(tiny, model_path, tmp_path):
    """Issue 9, case 4: the whole volume with S1, four sub-blocks again with S2, the whole volume
    with S1 again: the last run recomputes (before: "already done" over S2's voxels)."""
    out = new_output(tmp_path, tiny)
    s1, s2 = SCALING, SCALING * 1.5
    whole = ((0, 0, 0), SHAPE)
    assert not segment(tiny, out, *whole, s1, model=model_path).skipped
    first = out.read(out.box)
    subs = [((0, 0, 0), (16, 16, 16)), ((16, 16, 16), (32, 32, 32)), ((32, 0, 0), (48, 16, 16)), ((0, 32, 16), (16, 48, 32))]
    warnings: list[str] = []
    for sub in subs:
        assert not segment(tiny, out, *sub, s2, model=model_path, warn=warnings.append).skipped
    assert [w for w in warnings if "overlaps" in w] == [
        "this block overlaps 1 finished block(s) ([0,0,0 .. 48,48,32)): their done markers are removed, so they "
        "are segmented again when they next run"
    ]
    assert not np.array_equal(out.read(out.box), first)  # S2's voxels in the sub-blocks
    again = segment(tiny, out, *whole, s1, model=model_path, warn=warnings.append)
    assert not again.skipped and "overlaps 4 finished block(s)" in warnings[-1]
    np.testing.assert_array_equal(out.read(out.box), first)
    assert segment(tiny, out, *whole, s1, model=model_path).skipped  # its own marker is valid again
    assert not segment(tiny, out, *subs[0], s2, model=model_path).skipped  # the sub-block's was removed


def test_same_relative_path_to_another_volume_is_recomputed(tmp_path, model_path, monkeypatch):
    """The marker keys the input by its resolved path and identity: the same typed path naming another
    volume (another working directory) does not skip the block."""
    synthetic(tmp_path / "a" / "in.n5", seed=1)
    synthetic(tmp_path / "b" / "in.n5", seed=2)
    out = create_volume(tmp_path / "out.n5", "seg/s0", SHAPE, (16, 16, 16), "float32")
    block = ((0, 0, 0), (16, 16, 16))
    monkeypatch.chdir(tmp_path / "a")
    assert not segment(open_volume("in.n5", "c1/s0"), out, *block, model=model_path).skipped
    from_a = out.read(out.box)
    assert segment(open_volume("in.n5", "c1/s0"), out, *block, model=model_path).skipped
    monkeypatch.chdir(tmp_path / "b")
    assert not segment(open_volume("in.n5", "c1/s0"), out, *block, model=model_path).skipped
    assert not np.array_equal(out.read(out.box), from_a)


def test_output_replaced_while_a_block_runs(tiny, model_path, tmp_path, monkeypatch):
    """Replaced after the block's last chunk: no marker, an error naming it; replaced before its
    first chunk: not one chunk lands in the new dataset. The next run does the block."""
    out = new_output(tmp_path, tiny)
    block = ((0, 0, 0), (16, 16, 16))

    def replace():  # other chunks: a replacement, not the same dataset kept
        chunks = (8, 8, 8) if out.chunks == (16, 16, 16) else (16, 16, 16)
        create_volume(out.container, out.dataset, SHAPE, chunks, "float32", overwrite=True)

    for moment in ("block:chunks-written", "block:started"):
        hook = at(moment, replace)
        monkeypatch.setattr(testhook, "checkpoint", hook)
        with pytest.raises(OutputError, match=r"out.n5:/seg/s0 was replaced \(creation identity .*while this block ran"):
            segment(tiny, out, *block, model=model_path)
        assert hook.calls and not (out.path / DONE_DIR).exists()
        if moment == "block:started":
            assert [p.name for p in out.path.iterdir()] == ["attributes.json"]  # no chunk
        monkeypatch.undo()
        out = open_volume(out.container, out.dataset, mode="r+")
    assert not segment(tiny, out, *block, model=model_path).skipped
    assert segment(tiny, out, *block, model=model_path).skipped


def test_output_removed_while_a_block_runs(tiny, model_path, tmp_path, monkeypatch):
    """Removed before the first chunk: an error, and nothing is recreated at the path."""
    out = new_output(tmp_path, tiny)
    monkeypatch.setattr(testhook, "checkpoint", at("block:started", lambda: shutil.rmtree(out.path)))
    with pytest.raises(OutputError, match="out.n5:/seg/s0 was removed while this block ran"):
        segment(tiny, out, (0, 0, 0), (16, 16, 16), model=model_path)
    assert not out.path.exists()


def test_an_output_another_tool_made_is_segmented_and_its_replacement_still_seen(tiny, model_path, tmp_path):
    """The host's own create_n5 (when it keeps its processes and runs this image's volumeSegmentation)
    makes outputs without a creation identity: blocks still run, with one warning, and a replacement
    (which rewrites the metadata file) still voids their markers; create_volume.py adds an identity."""
    out = new_output(tmp_path, tiny)
    del out.array.attrs[IDENTITY_ATTRIBUTE]
    warnings: list[str] = []
    assert not segment(tiny, out, (0, 0, 0), (16, 16, 16), model=model_path, warn=warnings.append).skipped
    assert [w for w in warnings if "has no creation identity" in w] and len(warnings) == 1
    assert segment(tiny, out, (0, 0, 0), (16, 16, 16), model=model_path, warn=warnings.append).skipped
    # another tool replaces it (same geometry): the metadata file is new, the marker no longer counts
    import os

    attrs = out.path / "attributes.json"
    stat = attrs.stat()
    attrs.write_text(attrs.read_text())
    os.utime(attrs, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert not segment(tiny, out, (0, 0, 0), (16, 16, 16), model=model_path, warn=warnings.append).skipped
    kept = create_volume(out.container, out.dataset, SHAPE, (16, 16, 16), "float32")
    assert kept.array.attrs[IDENTITY_ATTRIBUTE]
    quiet: list[str] = []
    assert not segment(tiny, out, (0, 0, 0), (16, 16, 16), model=model_path, warn=quiet.append).skipped
    assert not [w for w in quiet if "creation identity" in w]


def test_aligned_blocks_never_take_the_unaligned_lock(tiny, model_path, tmp_path):
    out = new_output(tmp_path, tiny)
    with unaligned_lock(out):  # as if an unaligned job held it
        assert not segment(tiny, out, (0, 0, 0), (16, 16, 16), model=model_path).skipped
        with pytest.raises(OutputError, match="another job writing a block not aligned to the output chunks holds"):
            segment(tiny, out, (8, 0, 0), (24, 16, 16), model=model_path, allow_unaligned=True)
    assert not (out.path / DONE_DIR / "8_0_0-24_16_16.json").exists()


# --------------------------------------------------------------------------------------------
# The same through the scripts, with two processes
# --------------------------------------------------------------------------------------------


def block_args(inp: Path, out: Path, model: Path, start: str, end: str, *extra: str) -> list:
    return [
        "-i", inp, "-id", "c1/s0", "-o", out, "-od", "seg/s0", "-m", model, "-s", SCALING, "--start", start, "--end", end,
        "--model_input_shape", "132,132,132", "--no-progress", *extra,
    ]


def test_two_unaligned_jobs_never_run_at_once(tiny, model_path, tmp_path):
    """The first unaligned job holds the output's lock for its whole run; a second one on the same
    output stops at once with one error line (exit 2) and writes nothing; the first then finishes."""
    out = new_output(tmp_path, tiny)
    hook = tmp_path / "hook"
    hook.mkdir()
    inp = Path(tiny.container)
    first = start_paused(block_args(inp, out.container, model_path, "8,0,0", "24,16,16", "--allow-unaligned"), hook, "block:started")
    try:
        second = run_script("segment_volume.py", *block_args(inp, out.container, model_path, "24,0,0", "40,16,16", "--allow-unaligned"))
        one_error_line(second, f"another job writing a block not aligned to the output chunks holds {out.path}/.exllsm-unaligned.lock")
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        done = resume(first, hook, "block:started")
    finally:
        if first.poll() is None:
            first.kill()
    assert done.returncode == 0 and "1 tiles in" in done.stdout, done.stderr
    assert sorted(p.name for p in (out.path / DONE_DIR).iterdir()) == ["8_0_0-24_16_16.json"]
    with unaligned_lock(out):  # released when its holder ended
        pass


def test_create_volume_overwrite_while_a_block_runs(tiny, model_path, tmp_path):
    """Issue 9, case 1: create_volume.py --overwrite replaces the output while a block runs; the block
    exits 2 with one error line and marks nothing done in the new dataset."""
    out = new_output(tmp_path, tiny)
    hook = tmp_path / "hook"
    hook.mkdir()
    inp = Path(tiny.container)
    job = start_paused(block_args(inp, out.container, model_path, "0,0,0", "16,16,16"), hook, "block:chunks-written")
    try:
        run_script(
            "create_volume.py", "-i", inp, "-id", "c1/s0", "-o", out.container, "-od", "seg/s0", "--chunks", "8,8,8", "--overwrite",
            check=True,
        )
        done = resume(job, hook, "block:chunks-written")
    finally:
        if job.poll() is None:
            job.kill()
    one_error_line(done, f"the output dataset {out} was replaced (creation identity ")
    assert "the block is not marked done" in done.stderr
    new = open_volume(out.container, out.dataset)
    assert new.chunks == (8, 8, 8) and not (new.path / DONE_DIR).exists()
