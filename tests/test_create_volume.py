"""create_volume.py: --compression, and output locations it cannot write (one error line, exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BIN, run_script
from other_user import protect, run_as_other_user, shared_tmp

from exllsm_neuronseg.volume import create_volume


@pytest.fixture()
def template(tmp_path):
    create_volume(tmp_path / "in.n5", "c1/s0", (40, 30, 20), (16, 16, 8), "uint16")
    return tmp_path / "in.n5"


def one_error_line(proc, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], proc.stderr


@pytest.mark.parametrize(
    "args, entry, summary",
    [
        ((), {"type": "gzip", "level": 1, "useZlib": False}, "gzip level 1"),
        (("--compression", "bz2"), {"type": "bzip2", "blockSize": 9}, "bzip2 level 9"),
        (("--compression", "xz", "--compression-level", "3"), {"type": "xz", "preset": 3}, "xz preset 3"),
        (("--compression", "raw"), {"type": "raw"}, "raw"),
    ],
)
def test_compression_flag(template, tmp_path, args, entry, summary):
    proc = run_script("create_volume.py", "-i", template, "-id", "c1/s0", "-o", tmp_path / "o.n5", *args, check=True)
    assert proc.stdout.strip().endswith(f"float32, {summary}")
    assert json.loads((tmp_path / "o.n5" / "s0" / "attributes.json").read_text())["compression"] == entry


@pytest.mark.parametrize(
    "args, message",
    [
        (("--compression", "zstd"), "compression 'zstd' cannot be used: zarr 2.18's N5 format has no zstd mapping"),
        (("--compression", "lz77"), "unknown compression 'lz77'; allowed: gzip, raw, bzip2, xz, blosc"),
        (("--compression", "raw", "--compression-level", "2"), "compression raw takes no level"),
    ],
)
def test_bad_compression(template, tmp_path, args, message):
    proc = run_script("create_volume.py", "-i", template, "-id", "c1/s0", "-o", tmp_path / "o.n5", *args)
    one_error_line(proc, message)
    assert not (tmp_path / "o.n5").exists()


def test_output_under_a_plain_file(template, tmp_path):
    (tmp_path / "plain").write_text("x")
    proc = run_script("create_volume.py", "-i", template, "-id", "c1/s0", "-o", tmp_path / "plain" / "o.n5")
    one_error_line(proc, "which is not a directory")
    proc = run_script("create_volume.py", "-i", template, "-id", "c1/s0", "-o", tmp_path / "plain")
    one_error_line(proc, "it exists and is a file, not a directory")


def test_output_in_a_read_only_place():
    """A read-only parent folder, and an existing container of another user (root-owned output)."""
    with shared_tmp() as tmp:
        create_volume(tmp / "in.n5", "c1/s0", (40, 30, 20), (16, 16, 8), "uint16")
        (tmp / "ro").mkdir()
        create_volume(tmp / "theirs.n5", "s0", (40, 30, 20), (16, 16, 8), "float32")
        protect(tmp / "ro")
        protect(tmp / "theirs.n5")
        script = BIN / "create_volume.py"
        for out, dataset, path in ((tmp / "ro" / "o.n5", "s0", tmp / "ro"), (tmp / "theirs.n5", "s1", tmp / "theirs.n5")):
            proc = run_as_other_user([script, "-i", tmp / "in.n5", "-id", "c1/s0", "-o", out, "-od", dataset])
            one_error_line(proc, f"{path} is not writable by this user (uid ")
        assert not (tmp / "ro" / "o.n5").exists() and not (tmp / "theirs.n5" / "s1").exists()


@pytest.mark.parametrize(
    "output, dataset, message",
    [
        (None, "c1/s0", "is the input dataset itself"),
        (None, "/c1//s0/", "is the input dataset itself"),
        (None, "c1", "is a group (it holds other datasets)"),
        (None, "c1/s0/seg", "would lie inside the dataset /c1/s0"),
        ("o.n5", "../escape", "'.' or '..' segment"),
        ("o.n5", ".", "'.' or '..' segment"),
    ],
)
def test_outputs_that_would_destroy_data_are_refused(template, tmp_path, output, dataset, message):
    """The input itself, a group of datasets, a path inside a dataset or outside the container: one
    error line, even with --overwrite, and nothing changes."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = template if output is None else tmp_path / output
    proc = run_script("create_volume.py", "-i", template, "-id", "c1/s0", "-o", out, "-od", dataset, "--overwrite")
    one_error_line(proc, message)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_identical_output_is_kept_even_with_overwrite(template, tmp_path):
    """A re-run keeps the finished blocks of an output of the same geometry, with its own codec;
    --overwrite replaces only one that differs."""
    first = run_script("create_volume.py", "-i", template, "-id", "c1/s0", "-o", tmp_path / "o.n5", "--compression", "xz", check=True)
    assert first.stdout.strip().endswith("float32, xz preset 6") and "(existing, kept)" not in first.stdout
    out = create_volume(tmp_path / "o.n5", "s0", (40, 30, 20), (16, 16, 8), "float32")
    out.write_zyx((0, 0, 0), np.ones((8, 16, 16), np.float32))
    again = run_script("create_volume.py", "-i", template, "-id", "c1/s0", "-o", tmp_path / "o.n5", "--overwrite", check=True)
    assert "(existing, kept)" in again.stdout and again.stdout.strip().endswith("float32, xz preset 6")
    assert out.read_zyx(out.box).sum() == 8 * 16 * 16
    other = run_script("create_volume.py", "-i", template, "-id", "c1/s0", "-o", tmp_path / "o.n5", "--dtype", "uint8", "--overwrite", check=True)
    assert other.stdout.strip().endswith("uint8, gzip level 1")


def test_an_empty_folder_becomes_an_n5_container(template, tmp_path):
    (tmp_path / "plain").mkdir()
    run_script("create_volume.py", "-i", template, "-id", "c1/s0", "-o", tmp_path / "plain", check=True)
    assert json.loads((tmp_path / "plain" / "s0" / "attributes.json").read_text())["dimensions"] == [40, 30, 20]
    assert not (tmp_path / "plain" / ".zgroup").exists()
