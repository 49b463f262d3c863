"""One line for every failure (issue 9, item 5): truncated or garbage input chunks, unreadable
metadata, read-only and full disks, leftover `.partial` chunk files of killed jobs, absurd thread
counts. Each is one `error:` line (or one note) and exit 2 where users meet it, never a traceback,
and nothing a re-run would trust is left behind.

Full and read-only disks are real where the machine allows it: a small tmpfs mounted for the test
(root only; skipped elsewhere). The library-level tests simulate a full disk with a write that
raises OSError(ENOSPC) and run everywhere."""

from __future__ import annotations

import errno
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import SCALING, run_script

from exllsm_neuronseg.errors import ChunkError, OutputError, VolumeError
from exllsm_neuronseg.geometry import Box
from exllsm_neuronseg.volume import create_volume, io_executor, max_io_threads, open_volume

from test_bad_numbers import assert_one_error
from test_cli import host_args, tree_digest

COMPRESSIONS = ["gzip", "raw", "blosc", "bzip2", "xz"]


def small_volume(path, compression="gzip", dtype="uint16"):
    """A 32x24x16 volume of 8^3 chunks (36 chunks) with distinct values."""
    shape = (32, 24, 16)
    vol = create_volume(path, "c1/s0", shape, (8, 8, 8), dtype, compression=compression)
    data = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape[::-1]).astype(dtype)
    vol.write_chunked_zyx(Box((0, 0, 0), shape), data)
    return vol


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\x07not a chunk" * 9, "empty": b""}[how])


# ---- truncated and garbage chunks ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["n5", "zarr"])
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_a_bad_chunk_is_named_by_every_read(kind, compression, how, tmp_path):
    vol = small_volume(tmp_path / f"v.{kind}", compression)
    chunk = vol.chunk_file((2, 1, 1))
    assert chunk.is_file()
    damage(chunk, how)
    vol = open_volume(vol.container, "c1/s0")
    reads = (
        lambda: vol.read(vol.box),
        lambda: vol.read_finite(Box((10, 4, 4), (30, 20, 12))),
        lambda: vol.read_chunked_zyx(vol.box, io_executor(2)),
        lambda: vol.read_reflect_zyx(Box((-5, -5, -5), (40, 30, 20)), io_executor(2)),
    )
    for read in reads:
        with pytest.raises(ChunkError) as info:
            read()
        assert f"chunk file {chunk} of {vol} is truncated or corrupt: it does not decode as a" in str(info.value)
    vol.read(Box((0, 0, 0), (16, 8, 8)))  # the other chunks still read


CHUNK_CASES = {
    "segment, block scaling (no -s)": ("segment_volume.py", []),
    "segment, tile read (-s)": ("segment_volume.py", ["--scaling", str(SCALING)]),
    "scaling factor": ("scaling_factor.py", []),
}


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_a_bad_input_chunk_is_one_line_in_every_stage(case, how, synthetic_n5, model_path, tmp_path):
    """No `Aborted.`, no traceback: one line naming the chunk file, exit 2, the output untouched.
    (plan_blocks.py and create_volume.py read no chunks; a TIFF input has its own errors.)"""
    source, _ = synthetic_n5
    inp = tmp_path / "in.n5"
    shutil.copytree(source, inp)
    chunk = inp / "c1" / "s0" / "1" / "0" / "1"  # x 32..64, y 0..32, z 32..64: inside the 64^3 block's window
    damage(chunk, how)
    out = tmp_path / "out.n5"
    create_volume(out, "seg/s0", (150, 140, 130), (32, 32, 32), "float32")
    before = tree_digest(out)
    script, extra = CHUNK_CASES[case]
    if script == "segment_volume.py":
        args = [*host_args(inp, out, model_path, **{"--scaling": None}), *extra, "--no-progress"]
    else:
        args = ["-i", inp, "-d", "/c1/s0", "--partition_size", "64", "-p", "1"]
    proc = run_script(script, *args)
    assert_one_error(proc, f"chunk file {chunk} of {inp}:/c1/s0 is truncated or corrupt")
    assert "Aborted" not in proc.stderr and "Calculated a scaling factor" not in proc.stdout
    assert tree_digest(out) == before


@pytest.mark.parametrize("script", ["plan_blocks.py", "scaling_factor.py", "create_volume.py"])
def test_unreadable_dataset_metadata_is_one_line(script, tmp_path):
    vol = small_volume(tmp_path / "v.n5")
    (vol.path / "attributes.json").write_text("{garbage")
    flag = "-d" if script == "scaling_factor.py" else "-id"
    extra = {
        "plan_blocks.py": ["-o", tmp_path / "b.txt", "--scaling_output", tmp_path / "j.txt"],
        "create_volume.py": ["-o", tmp_path / "o.n5", "-od", "seg"],
        "scaling_factor.py": [],
    }[script]
    proc = run_script(script, "-i", vol.container, flag, "/c1/s0", *extra)
    assert_one_error(proc, f"{vol} has unreadable metadata ({vol.path / 'attributes.json'}: JSONDecodeError")
    with pytest.raises(VolumeError, match="unreadable metadata"):
        open_volume(vol.container, "c1/s0")


# ---- leftover .partial chunk files ---------------------------------------------------------


def plant_leftover(vol, index) -> Path:
    """A temporary chunk file as zarr's stores and Volume.write_chunk name it: <chunk>.<32 hex>.partial."""
    chunk = vol.chunk_file(index)
    chunk.parent.mkdir(parents=True, exist_ok=True)
    leftover = chunk.with_name(f"{chunk.name}.{uuid.uuid4().hex}.partial")
    leftover.write_bytes(b"half a chunk")
    return leftover


@pytest.mark.parametrize("kind", ["n5", "zarr"])
def test_leftover_partial_chunks_are_removed_only_in_the_box(kind, tmp_path, monkeypatch):
    vol = create_volume(tmp_path / f"o.{kind}", "seg", (30, 20, 20), (8, 8, 8), "float32")
    # a write killed between its temporary file and the rename (the hook: os.replace never returns)
    if kind == "n5":
        def killed(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr("exllsm_neuronseg.volume.os.replace", killed)
        with pytest.raises(KeyboardInterrupt):
            vol.write_chunk((8, 0, 0), np.ones((8, 8, 8), np.float32))
        monkeypatch.undo()
        (real,) = vol.chunk_file((1, 0, 0)).parent.glob("*.partial")
    else:
        real = plant_leftover(vol, (1, 0, 0))
    inside = [real, plant_leftover(vol, (0, 0, 0)), plant_leftover(vol, (3, 1, 1))]  # (3,1,1): the edge chunk 24..30
    outside = [plant_leftover(vol, (0, 2, 0)), plant_leftover(vol, (1, 0, 2))]
    other = vol.chunk_file((0, 0, 0)).with_name("notes.partial")
    other.write_text("not a chunk's")
    partly = Box((0, 0, 0), (30, 16, 12))  # z 12: cuts chunk row z 8..16
    assert vol.remove_partial_chunk_files(partly, whole_chunks_only=True) == 2  # not (3,1,1): z 8..16 is cut
    assert vol.remove_partial_chunk_files(partly) == 1
    assert not any(p.exists() for p in inside)
    assert all(p.exists() for p in outside) and other.exists()
    assert vol.remove_partial_chunk_files(Box((0, 0, 0), (30, 20, 20))) == 2


def test_a_block_run_removes_its_leftovers_and_caps_io_threads(synthetic_n5, model_path, tmp_path):
    """The next run of a killed block removes the `.partial` chunk files inside its own chunks only;
    --io-threads 100000 runs with the cap and one note. Runs the model on one 132^3 tile."""
    inp, _ = synthetic_n5
    out = create_volume(tmp_path / "o.n5", "seg/s0", (150, 140, 130), (32, 32, 32), "float32")
    inside = [plant_leftover(out, (0, 0, 0))]
    outside = [plant_leftover(out, (1, 0, 0)), plant_leftover(out, (0, 0, 1)), plant_leftover(out, (1, 1, 1))]
    tile = {"--model_input_shape": "132,132,132", "--model_output_shape": "44,44,44", "--end": "32,32,32"}
    proc = run_script(
        "segment_volume.py", *host_args(inp, out.container, model_path, **tile), "--io-threads", "100000",
        "--no-progress", check=True,
    )
    cap = max_io_threads()
    notes = [line for line in proc.stderr.splitlines() if "I/O threads" in line]
    assert notes == [f"warning: 100000 I/O threads asked for: using {cap} (at most 4 per CPU core, 64 in all)"]
    assert not any(p.exists() for p in inside) and all(p.exists() for p in outside)
    assert (out.read(Box((0, 0, 0), (32, 32, 32))) > 0).all()


def test_io_threads_are_capped_in_tiff_to_n5(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "stack.tif", np.arange(8 * 16 * 16, dtype=np.uint16).reshape(8, 16, 16))
    proc = run_script("tiff_to_n5.py", "-i", tmp_path / "stack.tif", "-o", tmp_path / "t.n5", "-d", "/raw",
                      "-c", "8,8,8", "--io-threads", "100000", "--no-progress", check=True)
    assert f"100000 I/O threads asked for: using {max_io_threads()}" in proc.stderr
    assert 2 <= max_io_threads() <= 64


# ---- full and read-only disks --------------------------------------------------------------


@pytest.fixture()
def small_fs(tmp_path):
    """A real 512 kB file system (tmpfs); skipped where this user cannot mount one."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): the ENOSPC simulations cover the library")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(mount_point: Path) -> None:
    """Fill the file system to the last byte."""
    with open(mount_point / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def make_read_only(mount_point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)


def stage_commands(source: Path, target: Path, tmp_path: Path) -> dict[str, list]:
    import tifffile

    tifffile.imwrite(tmp_path / "stack.tif", np.arange(16 * 32 * 32, dtype=np.uint16).reshape(16, 32, 32))
    return {
        "create_volume.py": ["-i", source, "-id", "/c1/s0", "-o", target / "o.n5", "-od", "/seg/s0"],
        "plan_blocks.py": ["-i", source, "-id", "/c1/s0", "-o", target / "b.txt", "--scaling_output", target / "j.txt"],
        "scaling_factor.py": ["-i", source, "-d", "/c1/s0", "-n", "1", "--partition_size", "64", "--scaling_plots_dir", target / "plots"],
        "make_test_volume.py": ["-o", target / "t.n5", "--shape", "64,64,64", "--chunks", "32,32,32"],
        "tiff_to_n5.py": ["-i", tmp_path / "stack.tif", "-o", target / "t.n5", "-d", "/raw", "-c", "16,16,16", "--no-progress"],
    }


@pytest.mark.parametrize("state", ["full", "read-only"])
@pytest.mark.parametrize("script", ["create_volume.py", "plan_blocks.py", "scaling_factor.py", "make_test_volume.py", "tiff_to_n5.py"])
def test_every_writing_stage_on_a_full_or_read_only_disk(script, state, small_fs, synthetic_n5, tmp_path):
    source, _ = synthetic_n5
    args = stage_commands(source, small_fs, tmp_path)[script]
    (small_fs / "plots").mkdir()  # scaling_factor.py: the plot itself fails, not its folder
    if state == "full":
        fill(small_fs)
    else:
        make_read_only(small_fs)
    proc = run_script(script, *args)
    line = assert_one_error(proc)
    assert ("No space left on device" if state == "full" else "read-only file system") in line.replace("Read-only", "read-only")
    left = sorted(str(p.relative_to(small_fs)) for p in small_fs.rglob("*") if p.is_file() and p.name != "filler")
    if script == "plan_blocks.py":
        assert not [p for p in left if p.endswith(".partial")] and "j.txt" not in left  # no half list
    if script == "scaling_factor.py":
        assert not [p for p in left if p.endswith(".png")]  # no half-written plot
    if script == "tiff_to_n5.py":
        assert not (small_fs / "t.n5" / "raw").exists()  # never a dataset that looks converted


def test_segment_volume_into_a_read_only_output(small_fs, synthetic_n5, model_path):
    source, _ = synthetic_n5
    create_volume(small_fs / "o.n5", "seg/s0", (150, 140, 130), (32, 32, 32), "float32")
    make_read_only(small_fs)
    proc = run_script("segment_volume.py", *host_args(source, small_fs / "o.n5", model_path), "--no-progress")
    assert_one_error(proc, "is not writable")


def test_a_full_disk_at_a_chunk_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Simulated (runs everywhere): the chunk's temporary file is written, then the disk is full."""
    vol = create_volume(tmp_path / "o.n5", "seg", (16, 16, 16), (8, 8, 8), "float32")
    real_open = open

    class Full:
        def __init__(self, path, mode):
            self.file = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.file.name))

    monkeypatch.setattr("exllsm_neuronseg.volume.open", Full, raising=False)
    with pytest.raises(OutputError, match="No space left on device"):
        vol.write_chunk((0, 0, 0), np.ones((8, 8, 8), np.float32))
    assert not list(vol.path.rglob("*.partial")) and not vol.chunk_file((0, 0, 0)).exists()


@pytest.mark.parametrize(
    "script, args",
    [
        ("create_volume.py", ["-i", "{inp}", "-id", "/c1/s0", "-o", "", "-od", "/x"]),
        ("segment_volume.py", ["-i", "{inp}", "-id", "/c1/s0", "-o", "", "-od", "/x", "-m", "{model}", "-s", "0.1"]),
        ("tiff_to_n5.py", ["-i", "{tif}", "-o", "", "-d", "/raw", "-c", "16,16,16"]),
        ("make_test_volume.py", ["-o", "", "--shape", "32,32,32"]),
        ("scaling_factor.py", ["-i", "", "-d", "/c1/s0"]),
        ("plan_blocks.py", ["-i", "{inp}", "-id", "/c1/s0", "-o", "", "--scaling_output", "j.txt"]),
    ],
)
def test_an_empty_path_is_an_error_not_the_current_directory(script, args, synthetic_n5, model_path, tmp_path):
    """`-o ""` (an unset variable in a pipeline) would write into the working directory: refused."""
    import os
    import sys

    import tifffile

    from conftest import BIN

    tifffile.imwrite(tmp_path / "s.tif", np.zeros((8, 16, 16), np.uint16), photometric="minisblack")
    work = tmp_path / "cwd"
    work.mkdir()
    values = {"inp": str(synthetic_n5[0]), "model": str(model_path), "tif": str(tmp_path / "s.tif")}
    proc = subprocess.run(
        [sys.executable, str(BIN / script), *(a.format(**values) for a in args)],
        capture_output=True, text=True, cwd=work, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert_one_error(proc, "''")
    assert not list(work.iterdir())


def test_a_corrupt_output_chunk_read_back_for_a_partial_write_is_named(tmp_path):
    """Writing part of a chunk reads the chunk back first: a corrupt one is a ChunkError naming the
    file (one error line in the scripts), not a codec traceback."""
    vol = create_volume(tmp_path / "o.n5", "s0", (16, 16, 16), (8, 8, 8), "float32")
    vol.write_zyx((0, 0, 0), np.ones((8, 8, 8), np.float32))
    (vol.path / "0" / "0" / "0").write_bytes(b"\x00\x00garbage")
    with pytest.raises(ChunkError, match=r"chunk file .*s0/0/0/0 of .* is truncated or corrupt"):
        vol.write_zyx((2, 2, 2), np.zeros((2, 2, 2), np.float32))
    vol.write_zyx((8, 8, 8), np.zeros((8, 8, 8), np.float32))  # other chunks are not affected
