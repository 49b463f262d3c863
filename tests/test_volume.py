"""Volume I/O: N5 and zarr v2 containers, x,y,z order, reflect reads, dataset creation."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from exllsm_neuronseg.errors import OutputError, VolumeError
from exllsm_neuronseg.geometry import Box
from exllsm_neuronseg.volume import create_volume, input_attributes, io_executor, open_volume


@pytest.fixture(params=["n5", "zarr"])
def container(request, tmp_path):
    return tmp_path / f"data.{request.param}"


def test_roundtrip_in_xyz(container):
    data = np.arange(20 * 12 * 7, dtype=np.uint16).reshape(20, 12, 7)  # x,y,z
    vol = create_volume(container, "/c1/s0/", data.shape, (8, 8, 4), "uint16")
    vol.write_chunked_zyx(Box((0, 0, 0), data.shape), data.transpose(2, 1, 0), io_executor(2))
    again = open_volume(container, "c1/s0")
    assert again.shape == (20, 12, 7) and again.chunks == (8, 8, 4) and again.dtype == np.uint16
    np.testing.assert_array_equal(again.read(Box((3, 2, 1), (17, 12, 6))), data[3:17, 2:12, 1:6])


def test_n5_metadata_is_x_y_z(tmp_path):
    vol = create_volume(tmp_path / "a.n5", "s0", (30, 20, 10), (16, 8, 4), "float32")
    attrs = json.loads((vol.path / "attributes.json").read_text())
    assert attrs["dimensions"] == [30, 20, 10] and attrs["blockSize"] == [16, 8, 4]
    assert attrs["compression"]["type"] == "gzip" and attrs["dataType"] == "float32"


def test_reflect_read_matches_numpy_pad(tmp_path):
    data = np.random.default_rng(0).integers(0, 1000, (20, 15, 10)).astype(np.uint16)
    vol = create_volume(tmp_path / "r.n5", "s0", data.shape, (7, 7, 7), "uint16")
    vol.write_chunked_zyx(Box((0, 0, 0), data.shape), data.transpose(2, 1, 0))
    box = Box((-5, 3, -9), (25, 15, 19))
    got = vol.read_reflect_zyx(box, io_executor(2)).transpose(2, 1, 0)
    expected = np.pad(data, ((5, 5), (0, 0), (9, 9)), mode="reflect")[:, 3:15, :]
    np.testing.assert_array_equal(got, expected)


def test_reflect_read_reaching_past_the_box(tmp_path):
    """A box near the far edge whose reflections fall outside the box itself."""
    data = np.arange(20, dtype=np.uint16).reshape(20, 1, 1) * np.ones((1, 3, 3), np.uint16)
    vol = create_volume(tmp_path / "e.n5", "s0", data.shape, (8, 8, 8), "uint16")
    vol.write_chunked_zyx(Box((0, 0, 0), data.shape), data.transpose(2, 1, 0))
    got = vol.read_reflect_zyx(Box((15, 0, 0), (30, 3, 3))).transpose(2, 1, 0)
    np.testing.assert_array_equal(got[:, 0, 0], np.pad(data[:, 0, 0], (0, 10), mode="reflect")[15:])


def test_missing_things_are_named(tmp_path):
    with pytest.raises(VolumeError, match="does not exist"):
        open_volume(tmp_path / "nope.n5", "s0")
    create_volume(tmp_path / "a.n5", "c1/s0", (8, 8, 8), (4, 4, 4), "uint8")
    with pytest.raises(VolumeError, match=r"dataset /c2/s0 does not exist.*/c1/s0"):
        open_volume(tmp_path / "a.n5", "/c2/s0")
    with pytest.raises(VolumeError, match="is a group, not a dataset"):
        open_volume(tmp_path / "a.n5", "/c1")


def test_not_3d(tmp_path):
    import zarr

    zarr.open(str(tmp_path / "x.zarr"), mode="w", shape=(4, 4), dtype="u1")
    with pytest.raises(VolumeError, match="2 dimensions"):
        open_volume(tmp_path / "x.zarr", "")


def test_create_keeps_compatible_and_refuses_incompatible(tmp_path):
    vol = create_volume(tmp_path / "o.n5", "seg/s0", (16, 16, 16), (8, 8, 8), "float32")
    vol.write_zyx((0, 0, 0), np.ones((8, 8, 8), np.float32))
    same = create_volume(tmp_path / "o.n5", "seg/s0", (16, 16, 16), (8, 8, 8), "float32")
    assert same.read(Box((0, 0, 0), (8, 8, 8))).sum() == 512  # data kept: re-runs keep finished blocks
    with pytest.raises(OutputError, match="already exists.*replace it explicitly"):
        create_volume(tmp_path / "o.n5", "seg/s0", (16, 16, 16), (8, 8, 8), "uint8")
    fresh = create_volume(tmp_path / "o.n5", "seg/s0", (16, 16, 16), (8, 8, 8), "uint8", overwrite=True)
    assert fresh.dtype == np.uint8 and fresh.read(Box((0, 0, 0), (8, 8, 8))).sum() == 0


def test_a_replacement_killed_while_deleting_the_old_dataset(tmp_path, monkeypatch):
    """The old dataset (chunks, attributes and done markers together) leaves its path in one rename,
    and the new one, complete, is renamed in before the old one is deleted: killed while deleting,
    the replacement has left the new dataset in place (no markers, no old chunks), and the next
    create removes the rest of the old one. (Kills between the other steps: test_data_integrity.)"""
    import shutil

    from exllsm_neuronseg import volume as volume_module

    old = create_volume(tmp_path / "o.n5", "seg/s0", (16, 16, 16), (8, 8, 8), "float32")
    old.write_zyx((0, 0, 0), np.ones((16, 16, 16), np.float32))
    (old.path / ".exllsm-done").mkdir()
    (old.path / ".exllsm-done" / "0_0_0-16_16_16.json").write_text("{}")

    class Killed(BaseException):
        pass

    def killed(path, *args, **kwargs):
        raise Killed  # the process dies while deleting the old chunks

    monkeypatch.setattr(volume_module.shutil, "rmtree", killed)
    with pytest.raises(Killed):
        create_volume(tmp_path / "o.n5", "seg/s0", (16, 16, 16), (8, 8, 8), "uint8", overwrite=True)
    new = open_volume(tmp_path / "o.n5", "seg/s0")
    assert new.dtype == np.uint8 and new.read(new.box).sum() == 0 and not (new.path / ".exllsm-done").exists()
    monkeypatch.undo()
    assert shutil.rmtree is not killed
    fresh = create_volume(tmp_path / "o.n5", "seg/s0", (16, 16, 16), (8, 8, 8), "uint8")
    assert fresh.dtype == np.uint8 and fresh.read(fresh.box).sum() == 0
    assert not (fresh.path / ".exllsm-done").exists()
    assert [p.name for p in (tmp_path / "o.n5" / "seg").iterdir() if p.is_dir()] == ["s0"]  # the leftover is gone


def test_resolution_attributes_carry_over(tmp_path):
    src = create_volume(tmp_path / "i.n5", "s0", (8, 8, 8), (4, 4, 4), "uint16", attributes={"pixelResolution": [0.1, 0.1, 0.2], "other": 1})
    assert input_attributes(src) == {"pixelResolution": [0.1, 0.1, 0.2]}


def test_create_volume_in_a_place_that_is_not_a_directory(tmp_path):
    (tmp_path / "plain").write_text("not a directory")
    with pytest.raises(OutputError, match=r"lies under the file .*plain, which is not a directory"):
        create_volume(tmp_path / "plain" / "out.n5", "s0", (8, 8, 8), (4, 4, 4), "uint8")
    with pytest.raises(OutputError, match=r"plain: it exists and is a file, not a directory"):
        create_volume(tmp_path / "plain", "s0", (8, 8, 8), (4, 4, 4), "uint8")
    assert (tmp_path / "plain").read_text() == "not a directory"


WRITE_AS_OTHER_USER = """
import sys
import numpy as np
from exllsm_neuronseg.errors import OutputError
from exllsm_neuronseg.volume import create_volume, open_volume
container, what = sys.argv[1], sys.argv[2]
try:
    if what in ("write_zyx", "write_chunk"):
        vol = open_volume(container, "s0", mode="r+")
        getattr(vol, what)((int(sys.argv[3]), 0, 0), np.ones((4, 4, 4), np.uint16))
    else:
        create_volume(container, "s0", (8, 8, 8), (4, 4, 4), "uint16")
except OutputError as exc:
    print(exc)
    sys.exit(3)
"""


def test_chunk_writes_into_another_users_dataset_name_the_path_and_the_fix():
    """Output left by a container run as root (docker run without -u): existing chunk folders belong
    to root, and the next writer, another user, gets one error naming the folder, its uid and the fix."""
    from other_user import IS_ROOT, protect, run_as_other_user, shared_tmp

    with shared_tmp() as tmp:
        vol = create_volume(tmp / "o.n5", "s0", (8, 8, 8), (4, 4, 4), "uint16")
        vol.write_zyx((0, 0, 0), np.full((4, 4, 4), 7, np.uint16))  # folder s0/0/0 exists
        protect(vol.path)
        script = tmp / "write.py"
        script.write_text(WRITE_AS_OTHER_USER)
        cases = [(0, vol.path / "0" / "0"), (4, vol.path)]  # a chunk in an existing folder, a new folder
        for (x0, folder), method in itertools.product(cases, ("write_zyx", "write_chunk")):
            proc = run_as_other_user([script, tmp / "o.n5", method, x0])
            assert proc.returncode == 3, proc.stderr
            message = proc.stdout.strip()
            assert message.startswith(f"cannot write chunks of {tmp / 'o.n5'}:/s0: {folder} is not writable by this user (uid ")
            if IS_ROOT:
                assert "it belongs to uid 0" in message and '-u "$(id -u):$(id -g)"' in message
                assert f"chown -R 65534:65534 {vol.path}" in message
            else:
                assert "chmod u+w" in message
        assert open_volume(tmp / "o.n5", "s0").read(Box((0, 0, 0), (8, 4, 4)))[:4].min() == 7  # untouched


def test_create_volume_in_a_read_only_folder():
    from other_user import protect, run_as_other_user, shared_tmp

    with shared_tmp() as tmp:
        (tmp / "ro").mkdir()
        protect(tmp / "ro")
        script = tmp / "create.py"
        script.write_text(WRITE_AS_OTHER_USER)
        proc = run_as_other_user([script, tmp / "ro" / "out.n5", "create"])
        assert proc.returncode == 3, proc.stderr
        assert f"{tmp / 'ro'} is not writable by this user (uid " in proc.stdout
        assert not (tmp / "ro" / "out.n5").exists()


@pytest.mark.parametrize("compression", ["gzip", "raw", "bzip2", "blosc"])
@pytest.mark.parametrize("dtype", ["uint16", "uint8", "float32"])
def test_write_chunk_encodes_n5_blocks_like_zarr(tmp_path, compression, dtype):
    """Whole chunks written from a buffer the caller gives up read back the same, and an interior
    block is byte-identical to zarr's own; edge blocks hold their clipped size, as Java N5 writes."""
    data = (np.random.default_rng(1).random((20, 12, 7)) * 200).astype(dtype)  # x,y,z
    ours = create_volume(tmp_path / "a.n5", "s0", data.shape, (8, 8, 4), dtype, compression=compression)
    theirs = create_volume(tmp_path / "b.n5", "s0", data.shape, (8, 8, 4), dtype, compression=compression)
    for box in [Box((x, y, z), (min(x + 8, 20), min(y + 8, 12), min(z + 4, 7))) for x in (0, 8, 16) for y in (0, 8) for z in (0, 4)]:
        buffer = np.ascontiguousarray(data[box.slices()].transpose(2, 1, 0))
        ours.write_chunk(box.start, buffer)
        theirs.write_zyx(box.start, data[box.slices()].transpose(2, 1, 0))
    np.testing.assert_array_equal(open_volume(tmp_path / "a.n5", "s0").read(ours.box), data)
    assert (ours.path / "0" / "0" / "0").read_bytes() == (theirs.path / "0" / "0" / "0").read_bytes()
    edge = (ours.path / "2" / "1" / "1").read_bytes()
    assert [int.from_bytes(edge[4 + 4 * i : 8 + 4 * i], "big") for i in range(3)] == [4, 4, 3]
    with pytest.raises(ValueError, match="is not a chunk of"):
        ours.write_chunk((4, 0, 0), np.zeros((4, 8, 8), dtype))
