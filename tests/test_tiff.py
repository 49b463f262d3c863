"""TIFF series -> N5 (tiff.py, bin/tiff_to_n5.py): data and order, regions, voxel size, every bad
input (one error line, exit 2, no dataset), re-runs, and conversions stopped part-way."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import run_script

import exllsm_neuronseg.tiff as tiff_module
from exllsm_neuronseg.errors import GeometryError, OutputError, OutputExistsError, TiffError
from exllsm_neuronseg.tiff import find_tiffs, open_tiff_stack, tiff_to_n5
from exllsm_neuronseg.volume import create_volume, open_volume

SHAPE_ZYX = (7, 21, 30)  # x=30, y=21, z=7: no two axes alike
CHUNKS = (16, 8, 3)  # x,y,z, anisotropic


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A z,y,x uint16 image whose every voxel differs from its neighbours."""
    return np.random.default_rng(5).integers(0, 65535, SHAPE_ZYX, dtype=np.uint16)


def write_series(folder: Path, image: np.ndarray, name: str = "{}.tif", **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for z, plane in enumerate(image):
        tifffile.imwrite(folder / name.format(z), plane, **kwargs)
    return folder


def xyz(volume) -> np.ndarray:
    return volume.read(volume.box)


def chunk_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != "attributes.json"}


def no_dataset_left(container: Path) -> bool:
    """Nothing at the target and no temporary dataset: no N5 array anywhere in the container."""
    return not any("dimensions" in json.loads(p.read_text()) for p in container.rglob("attributes.json"))


def one_error_line(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Error" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


# ---- data --------------------------------------------------------------------------------------


def test_series_and_multipage_file_give_the_same_n5_in_x_y_z(image, tmp_path):
    write_series(tmp_path / "slices", image)
    tifffile.imwrite(tmp_path / "stack.tif", image)
    a = tiff_to_n5(tmp_path / "slices", tmp_path / "a.n5", "/raw/s0", CHUNKS, threads=2)
    b = tiff_to_n5(tmp_path / "stack.tif", tmp_path / "b.n5", "/raw/s0", CHUNKS, threads=3)
    assert a.volume.shape == b.volume.shape == (30, 21, 7)
    np.testing.assert_array_equal(xyz(a.volume), image.transpose(2, 1, 0))
    assert chunk_files(a.volume.path) == chunk_files(b.volume.path)  # bit-identical blocks
    attrs = json.loads((a.volume.path / "attributes.json").read_text())
    assert attrs["dimensions"] == [30, 21, 7] and attrs["blockSize"] == [16, 8, 3] and attrs["dataType"] == "uint16"
    assert (a.volume.path / "1" / "2" / "2").is_file()  # N5 block path x/y/z: the last block of each axis
    assert a.chunks_written == 2 * 3 * 3 and a.bytes_read == image.nbytes


def test_a_folder_with_one_multipage_file(image, tmp_path):
    (tmp_path / "one").mkdir()
    tifffile.imwrite(tmp_path / "one" / "volume.tif", image)
    result = tiff_to_n5(tmp_path / "one", tmp_path / "o.n5", "s0", CHUNKS)
    np.testing.assert_array_equal(xyz(result.volume), image.transpose(2, 1, 0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"compression": "zlib", "rowsperstrip": 16},  # deflate strips
        {"compression": "zlib", "rowsperstrip": 5, "predictor": True},  # horizontal differencing
        {"tile": (16, 16)},  # tiled, uncompressed
        {"compression": "zlib", "tile": (16, 16)},
        {"byteorder": ">"},  # big-endian, read in place
        {"rowsperstrip": 4},  # several contiguous uncompressed strips, read in place
        {"compression": "lzw", "rowsperstrip": 8},  # LZW (imagecodecs, in the tiff extra)
        {"compression": "lzw", "predictor": True, "tile": (16, 16)},
        {"compression": "zstd", "rowsperstrip": 8},
    ],
    ids=["zlib", "zlib-predictor", "tiled", "tiled-zlib", "big-endian", "strips", "lzw", "lzw-predictor-tiled", "zstd"],
)
def test_compressed_tiled_and_big_endian_input(image, tmp_path, kwargs):
    write_series(tmp_path / "slices", image, **kwargs)
    tifffile.imwrite(tmp_path / "stack.tif", image, **kwargs)
    for source, name in ((tmp_path / "slices", "a.n5"), (tmp_path / "stack.tif", "b.n5")):
        result = tiff_to_n5(source, tmp_path / name, "s0", CHUNKS, threads=2)
        np.testing.assert_array_equal(xyz(result.volume), image.transpose(2, 1, 0))


@pytest.mark.parametrize("memory_limit", [0, 10**9])
def test_strips_decoded_once_for_a_row_of_chunks(image, tmp_path, memory_limit):
    """Strips wider than a chunk: a row of chunks is read together when the memory allows (else one
    chunk at a time); a subvolume cuts the rows; both give the same data."""
    write_series(tmp_path / "s", image, compression="zlib", rowsperstrip=4)
    result = tiff_to_n5(tmp_path / "s", tmp_path / "o.n5", "s0", (8, 8, 3), subvol="3,2,1,30,15,5", memory_limit=memory_limit)
    expected = np.zeros((30, 21, 7), np.uint16)
    expected[3:, 2:17, 1:6] = image.transpose(2, 1, 0)[3:, 2:17, 1:6]
    np.testing.assert_array_equal(xyz(result.volume), expected)


def test_imagej_hyperstack_with_one_image_directory(image, tmp_path):
    """ImageJ writes stacks over 4 GB with one IFD and the slices back to back; read them in place."""
    tifffile.imwrite(tmp_path / "big.tif", image, imagej=True, truncate=True)
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert len(tif.pages) == 1
    result = tiff_to_n5(tmp_path / "big.tif", tmp_path / "o.n5", "s0", CHUNKS)
    np.testing.assert_array_equal(xyz(result.volume), image.transpose(2, 1, 0))


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
def test_other_dtypes(tmp_path, dtype):
    data = (np.arange(3 * 9 * 11) - 50).reshape(3, 9, 11).astype(dtype)
    write_series(tmp_path / "s", data)
    result = tiff_to_n5(tmp_path / "s", tmp_path / "o.n5", "s0", (4, 4, 2))
    assert result.volume.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(xyz(result.volume), data.transpose(2, 1, 0))


def test_slices_sorted_by_their_integer(tmp_path):
    planes = np.arange(13, dtype=np.uint8)[:, None, None] * np.ones((1, 4, 5), np.uint8)
    write_series(tmp_path / "plain", planes)  # 0.tif .. 12.tif: "12.tif" < "2.tif" as text
    write_series(tmp_path / "prefixed", planes, name="slice_{:04d}.tif")
    write_series(tmp_path / "unpadded", planes, name="C1-z{}.tif")
    assert [p.name for p in find_tiffs(tmp_path / "plain")][:4] == ["0.tif", "1.tif", "2.tif", "3.tif"]
    for folder in ("plain", "prefixed", "unpadded"):
        result = tiff_to_n5(tmp_path / folder, tmp_path / f"{folder}.n5", "s0", (5, 4, 4))
        assert list(xyz(result.volume)[0, 0, :]) == list(range(13)), folder


def test_gaps_in_the_slice_indices_are_stacked_with_one_warning(image, tmp_path, caplog):
    (tmp_path / "gaps").mkdir()
    for z, index in enumerate((0, 1, 5, 9)):
        tifffile.imwrite(tmp_path / "gaps" / f"{index}.tif", image[z])
    with caplog.at_level(logging.WARNING, logger="exllsm_neuronseg"):
        result = tiff_to_n5(tmp_path / "gaps", tmp_path / "o.n5", "s0", CHUNKS)
    np.testing.assert_array_equal(xyz(result.volume), image[:4].transpose(2, 1, 0))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "1.tif (index 1) is followed by 5.tif (index 5)" in warning
    assert "6 of the indices 0..9 are missing" in warning and "4 slices are stacked as consecutive z" in warning
    caplog.clear()
    write_series(tmp_path / "plain", image[:3], name="slice_{:04d}.tif")  # 0..2 and 1..3: no gap
    write_series(tmp_path / "from_one", image[:3], name="s{}.tif")
    (tmp_path / "from_one" / "s0.tif").rename(tmp_path / "from_one" / "s3.tif")
    with caplog.at_level(logging.WARNING, logger="exllsm_neuronseg"):
        find_tiffs(tmp_path / "plain")
        find_tiffs(tmp_path / "from_one")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_input_name_pattern_selects_the_slices(image, tmp_path):
    write_series(tmp_path / "s", image, name="img_{}.tiff")
    (tmp_path / "s" / "notes.txt").write_text("not a slice")
    tifffile.imwrite(tmp_path / "s" / "preview.tif", image[0])
    result = tiff_to_n5(tmp_path / "s", tmp_path / "o.n5", "s0", CHUNKS, pattern="img_*.tiff")
    np.testing.assert_array_equal(xyz(result.volume), image.transpose(2, 1, 0))


def test_subvol_fills_only_its_region(image, tmp_path):
    write_series(tmp_path / "s", image)
    result = tiff_to_n5(tmp_path / "s", tmp_path / "o.n5", "s0", CHUNKS, subvol="17,3,2,100,6,2")  # x clipped at 30
    vol = result.volume
    assert vol.shape == (30, 21, 7) and str(result.region) == "[17,3,2 .. 30,9,4)"
    expected = np.zeros((30, 21, 7), np.uint16)
    expected[17:30, 3:9, 2:4] = image.transpose(2, 1, 0)[17:30, 3:9, 2:4]
    np.testing.assert_array_equal(xyz(vol), expected)
    written = {str(p.relative_to(vol.path)) for p in vol.path.rglob("*") if p.is_file() and p.name != "attributes.json"}
    assert written == {"1/0/0", "1/1/0", "1/0/1", "1/1/1"}  # blocks outside the region are not written
    with pytest.raises(GeometryError, match=r"partial volume 30,0,0,5,5,5 starts at 30,0,0, outside the image 30,21,7"):
        tiff_to_n5(tmp_path / "s", tmp_path / "p.n5", "s0", CHUNKS, subvol="30,0,0,5,5,5")
    assert not (tmp_path / "p.n5").exists()


def test_voxel_size_from_imagej_calibration(image, tmp_path):
    meta = {"spacing": 0.42, "unit": "micron", "axes": "ZYX"}
    tifffile.imwrite(tmp_path / "cal.tif", image, imagej=True, resolution=(1 / 0.104, 1 / 0.104), metadata=meta)
    result = tiff_to_n5(tmp_path / "cal.tif", tmp_path / "o.n5", "s0", CHUNKS)
    attrs = json.loads((result.volume.path / "attributes.json").read_text())
    assert attrs["pixelResolution"]["unit"] == "um"
    np.testing.assert_allclose(attrs["pixelResolution"]["dimensions"], [0.104, 0.104, 0.42], rtol=1e-6)
    np.testing.assert_allclose(attrs["resolution"], [0.104, 0.104, 0.42], rtol=1e-6)
    plain = tiff_to_n5(tmp_path / "cal.tif", tmp_path / "o.n5", "plain", CHUNKS)
    assert "pixelResolution" in json.loads((plain.volume.path / "attributes.json").read_text())
    tifffile.imwrite(tmp_path / "raw.tif", image)  # no calibration: nothing made up
    bare = tiff_to_n5(tmp_path / "raw.tif", tmp_path / "o.n5", "bare", CHUNKS)
    assert "pixelResolution" not in json.loads((bare.volume.path / "attributes.json").read_text())


def test_compression_choice(image, tmp_path):
    write_series(tmp_path / "s", image)
    result = tiff_to_n5(tmp_path / "s", tmp_path / "o.n5", "s0", CHUNKS, compression="bz2")
    attrs = json.loads((result.volume.path / "attributes.json").read_text())
    assert attrs["compression"] == {"type": "bzip2", "blockSize": 9}
    np.testing.assert_array_equal(xyz(result.volume), image.transpose(2, 1, 0))


def test_one_chunk_in_flight_under_a_small_memory_limit(image, tmp_path):
    write_series(tmp_path / "s", image)
    result = tiff_to_n5(tmp_path / "s", tmp_path / "o.n5", "s0", CHUNKS, threads=4, memory_limit=0)
    np.testing.assert_array_equal(xyz(result.volume), image.transpose(2, 1, 0))


# ---- re-runs -----------------------------------------------------------------------------------


def test_rerun_skips_the_same_conversion_and_refuses_another(image, tmp_path):
    write_series(tmp_path / "s", image)
    out = tmp_path / "o.n5"
    first = tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS)
    stamps = {p: p.stat().st_mtime_ns for p in first.volume.path.rglob("*")}
    again = tiff_to_n5(tmp_path / "s", out, "/raw/s0/", CHUNKS)
    assert again.skipped and again.chunks_written == 0
    assert {p: p.stat().st_mtime_ns for p in first.volume.path.rglob("*")} == stamps  # nothing rewritten
    with pytest.raises(OutputExistsError, match=r"raw/s0 already exists and was converted with other settings.*replace it explicitly"):
        tiff_to_n5(tmp_path / "s", out, "raw/s0", (8, 8, 8))
    os.utime(tmp_path / "s" / "3.tif", ns=(time.time_ns(), time.time_ns()))  # a slice changed since
    with pytest.raises(OutputExistsError, match="from other files"):
        tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS)
    assert {p: p.stat().st_mtime_ns for p in first.volume.path.rglob("*")} == stamps
    replaced = tiff_to_n5(tmp_path / "s", out, "raw/s0", (8, 8, 8), overwrite=True)
    assert replaced.volume.chunks == (8, 8, 8)
    np.testing.assert_array_equal(xyz(replaced.volume), image.transpose(2, 1, 0))
    assert sorted(p.name for p in (out / "raw").iterdir()) == ["attributes.json", "s0"]  # no temporaries left


def test_a_rerun_into_a_zarr_container_is_skipped(image, tmp_path):
    write_series(tmp_path / "s", image)
    out = tmp_path / "o.zarr"
    first = tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS, subvol="17,3,2,100,6,2")
    assert (out / "raw" / "s0" / ".zarray").is_file() and not first.skipped
    stamps = {p: p.stat().st_mtime_ns for p in first.volume.path.rglob("*")}
    again = tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS, subvol="17,3,2,100,6,2")
    assert again.skipped and {p: p.stat().st_mtime_ns for p in first.volume.path.rglob("*")} == stamps
    # the same region, clipped to the image the same way, is the same conversion
    assert tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS, subvol="17,3,2,13,6,2").skipped
    with pytest.raises(OutputExistsError, match="converted with other settings"):
        tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS)  # the whole image
    replaced = tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS, overwrite=True)
    np.testing.assert_array_equal(xyz(replaced.volume), image.transpose(2, 1, 0))
    assert tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS).skipped
    assert sorted(p.name for p in (out / "raw").iterdir()) == [".zgroup", "s0"]


def test_replacing_discards_the_old_dataset_then_renames_the_new_one(image, tmp_path, monkeypatch):
    """One mechanism (volume.discard_dataset): stopped between its two steps, no dataset is at the
    target; the next run converts again and removes what a stopped deletion left behind."""
    write_series(tmp_path / "s", image)
    out = tmp_path / "o.n5"
    tiff_to_n5(tmp_path / "s", out, "raw/s0", (32, 32, 8))
    (out / "raw" / ".s0.replaced-99999").mkdir()  # left by a replacement killed while deleting
    (out / "raw" / ".s0.replaced-99999" / "attributes.json").write_text("{}")
    real = tiff_module.discard_dataset
    discarded = []

    def discard_then_stop(path):
        real(path)
        discarded.append(path.name)
        if path.name == "s0":
            raise KeyboardInterrupt  # killed after the old dataset is gone, before the rename

    monkeypatch.setattr(tiff_module, "discard_dataset", discard_then_stop)
    with pytest.raises(KeyboardInterrupt):
        tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS, overwrite=True)
    assert discarded == ["s0"]
    assert no_dataset_left(out) and not (out / "raw" / "s0").exists()
    monkeypatch.undo()
    result = tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS)
    np.testing.assert_array_equal(xyz(result.volume), image.transpose(2, 1, 0))
    assert sorted(p.name for p in (out / "raw").iterdir()) == ["attributes.json", "s0"]


def test_a_group_or_folder_at_the_target_is_never_replaced(image, tmp_path):
    write_series(tmp_path / "s", image)
    out = tmp_path / "o.n5"
    tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS)
    (out / "notes").mkdir()
    (out / "notes" / "keep.txt").write_text("mine")
    for dataset in ("raw", "notes"):
        with pytest.raises(OutputError, match=rf"o.n5:/{dataset} exists and is not a 3-D dataset.*never replaced"):
            tiff_to_n5(tmp_path / "s", out, dataset, CHUNKS, overwrite=True)
    np.testing.assert_array_equal(xyz(open_volume(out, "raw/s0")), image.transpose(2, 1, 0))
    assert (out / "notes" / "keep.txt").read_text() == "mine"


def test_a_dataset_not_made_by_a_conversion_is_refused(image, tmp_path):
    write_series(tmp_path / "s", image)
    create_volume(tmp_path / "o.n5", "s0", (30, 21, 7), CHUNKS, "uint16")
    with pytest.raises(OutputExistsError, match="was not made by this conversion"):
        tiff_to_n5(tmp_path / "s", tmp_path / "o.n5", "s0", CHUNKS)
    assert tiff_to_n5(tmp_path / "s", tmp_path / "o.n5", "s0", CHUNKS, overwrite=True).chunks_written == 18


def test_a_conversion_stopped_part_way_leaves_no_dataset(image, tmp_path):
    write_series(tmp_path / "s", image)

    def stop_after_three(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiff_to_n5(tmp_path / "s", tmp_path / "o.n5", "raw/s0", CHUNKS, progress=stop_after_three)
    assert no_dataset_left(tmp_path / "o.n5")
    # an overwrite stopped part-way keeps the old dataset
    tiff_to_n5(tmp_path / "s", tmp_path / "o.n5", "raw/s0", (32, 32, 8))
    with pytest.raises(KeyboardInterrupt):
        tiff_to_n5(tmp_path / "s", tmp_path / "o.n5", "raw/s0", CHUNKS, overwrite=True, progress=stop_after_three)
    assert open_volume(tmp_path / "o.n5", "raw/s0").chunks == (32, 32, 8)
    assert sorted(p.name for p in (tmp_path / "o.n5" / "raw").iterdir()) == ["attributes.json", "s0"]


KILL_AFTER_TWO_CHUNKS = """
import os, signal, sys
from exllsm_neuronseg.tiff import tiff_to_n5

def kill(done, total):
    if done == 2:
        os.kill(os.getpid(), signal.SIGKILL)

tiff_to_n5(sys.argv[1], sys.argv[2], "raw/s0", (16, 8, 3), progress=kill)
"""


def test_a_killed_conversion_leaves_no_target_and_the_rerun_completes(image, tmp_path):
    write_series(tmp_path / "s", image)
    out = tmp_path / "o.n5"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_CHUNKS, tmp_path / "s", out], check=False)
    assert proc.returncode == -9
    assert not (out / "raw" / "s0").exists()  # only the temporary dataset, never the target
    assert [p.name for p in (out / "raw").iterdir() if p.is_dir()] == [".s0.tiff_to_n5.partial"]
    proc = run_script("tiff_to_n5.py", "-i", tmp_path / "s", "-o", out, "-d", "raw/s0", "-c", "16,8,3", "--no-progress", check=True)
    assert "18 chunks from 7 TIFF files" in proc.stdout
    np.testing.assert_array_equal(xyz(open_volume(out, "raw/s0")), image.transpose(2, 1, 0))
    assert sorted(p.name for p in (out / "raw").iterdir()) == ["attributes.json", "s0"]


# ---- the command line --------------------------------------------------------------------------


def test_host_command_line(image, tmp_path):
    """The host's tif_to_n5 flags (contract 2.2), --distributed and --workers included."""
    write_series(tmp_path / "s", image)
    out = tmp_path / "o.n5"
    args = ["-i", tmp_path / "s", "--input_name_pattern", "*.tif", "-o", out, "-d", "/raw/s0", "-c", "16,8,3",
            "--subvol", "0,0,0,30,21,7", "--compression", "gzip", "--distributed", "--workers", "2"]
    proc = run_script("tiff_to_n5.py", *args, check=True)
    (line,) = proc.stdout.strip().splitlines()
    assert line.startswith(f"dataset {out}:/raw/s0: shape 30,21,7, chunks 16,8,3, uint16, gzip level 1: 18 chunks from 7 TIFF files in ")
    assert line.endswith(" MB/s)")
    np.testing.assert_array_equal(xyz(open_volume(out, "raw/s0")), image.transpose(2, 1, 0))
    again = run_script("tiff_to_n5.py", *args, check=True)
    assert again.stdout.strip() == f"dataset {out}:/raw/s0: already converted from these 7 TIFF files; nothing written"
    refused = run_script("tiff_to_n5.py", *args[:-2], "--chunk-size", "8")
    one_error_line(refused, "already exists", "--overwrite")
    kebab = run_script("tiff_to_n5.py", "--input", tmp_path / "s", "--input-name-pattern", "*.tif", "--output", out,
                       "--dataset", "/raw/s0", "--chunk-size", "8", "--overwrite", "--io-threads", "2", "--no-progress",
                       "--compression", "raw", check=True)
    assert "chunks 8,8,8, uint16, raw:" in kebab.stdout


def test_help_and_version():
    proc = run_script("tiff_to_n5.py", "--help", check=True)
    assert "slice_0002.tif" in proc.stdout.replace("\n", " ").replace("│", "")
    assert "exllsm-neuronseg" in run_script("tiff_to_n5.py", "--version", check=True).stdout


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def overlapping_output(tmp: Path, image: np.ndarray, layout: str) -> tuple[list, str]:
    """(tiff_to_n5.py arguments -i -o -d, the relation named) for an output that is, holds or lies in the input."""
    if layout == "input folder in the container":  # -i c.n5/raw -o c.n5 -d /raw
        write_series(tmp / "c.n5" / "raw", image)
        return ["-i", tmp / "c.n5" / "raw", "-o", tmp / "c.n5", "-d", "/raw"], "is the TIFF input"
    if layout == "container above the input folder":  # -i /d/slices -o /d -d slices
        write_series(tmp / "d" / "slices", image)
        return ["-i", tmp / "d" / "slices", "-o", tmp / "d", "-d", "slices"], "is the TIFF input"
    if layout == "input file inside the target":
        (tmp / "c.n5" / "raw").mkdir(parents=True)
        tifffile.imwrite(tmp / "c.n5" / "raw" / "stack.tif", image)
        return ["-i", tmp / "c.n5" / "raw" / "stack.tif", "-o", tmp / "c.n5", "-d", "raw"], "contains the TIFF input"
    if layout == "input folder inside the target":
        write_series(tmp / "d" / "slices", image)
        return ["-i", tmp / "d" / "slices", "-o", tmp, "-d", "d"], "contains the TIFF input"
    if layout == "target inside the input folder":
        write_series(tmp / "d" / "slices", image)
        return ["-i", tmp / "d" / "slices", "-o", tmp / "d" / "slices" / "o.n5", "-d", "s0"], "lies inside the TIFF input"
    if layout == "input through a link":
        write_series(tmp / "d" / "slices", image)
        (tmp / "link").symlink_to(tmp / "d" / "slices")
        return ["-i", tmp / "link", "-o", tmp / "d", "-d", "slices"], "is the TIFF input"
    assert layout == "container through a link"
    write_series(tmp / "d" / "slices", image)
    (tmp / "linked.n5").symlink_to(tmp / "d")
    return ["-i", tmp / "d" / "slices", "-o", tmp / "linked.n5", "-d", "slices"], "is the TIFF input"


OVERLAPS = [
    "input folder in the container", "container above the input folder", "input file inside the target",
    "input folder inside the target", "target inside the input folder", "input through a link", "container through a link",
]


@pytest.mark.parametrize("layout", OVERLAPS)
def test_an_output_that_is_holds_or_lies_in_the_input_is_refused(image, tmp_path, layout):
    """Whatever overwrite says, and before anything is touched: replacing it would delete the TIFFs."""
    args, relation = overlapping_output(tmp_path, image, layout)
    before = tree(tmp_path)
    with pytest.raises(OutputError, match=relation):
        tiff_to_n5(args[1], args[3], args[5], CHUNKS, overwrite=True)
    assert tree(tmp_path) == before
    if layout in ("input folder in the container", "target inside the input folder"):  # the CLI too
        proc = run_script("tiff_to_n5.py", *args, "-c", "16,8,3", "--overwrite", "--no-progress")
        one_error_line(proc, relation, "output dataset")
        assert len(proc.stderr.splitlines()) == 1
        assert tree(tmp_path) == before


def test_a_dataset_below_an_existing_dataset_is_one_error(image, tmp_path):
    write_series(tmp_path / "s", image)
    out = tmp_path / "o.n5"
    tiff_to_n5(tmp_path / "s", out, "raw/s0", CHUNKS)
    before = tree(out)
    proc = run_script("tiff_to_n5.py", "-i", tmp_path / "s", "-o", out, "-d", "raw/s0/sub", "--overwrite", "--no-progress")
    one_error_line(proc, f"{out}:/raw/s0/sub would lie inside the dataset /raw/s0")
    assert len(proc.stderr.splitlines()) == 1 and tree(out) == before


def bad_inputs(tmp: Path, image: np.ndarray) -> dict:
    """name -> (input, extra args, pieces of the message)"""
    cases = {}
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    cases["no file matches"] = (empty, [], ["no file in", "matches the pattern '*.tif'", "readme.txt"])
    cases["missing input"] = (tmp / "nope", [], [f"TIFF input {tmp / 'nope'} does not exist"])
    s = write_series(tmp / "stem", image[:3])
    tifffile.imwrite(s / "last.tif", image[0])
    cases["non-integer stem"] = (s, [], ["last.tif", "has no z index"])
    s = write_series(tmp / "prefixes", image[:2], name="a_{}.tif")
    tifffile.imwrite(s / "b_7.tif", image[0])
    cases["two prefixes"] = (s, [], ["a_0.tif", "b_7.tif", "different name prefixes"])
    s = write_series(tmp / "dup", image[:2])
    tifffile.imwrite(s / "01.tif", image[0])
    cases["repeated index"] = (s, [], ["the same z index 1"])
    s = write_series(tmp / "shapes", image[:4])
    tifffile.imwrite(s / "2.tif", image[2, :, :-1])
    cases["slice shapes differ"] = (s, [], [str(s / "2.tif"), "29x21", "30x21", "one shape and dtype"])
    s = write_series(tmp / "dtypes", image[:4])
    tifffile.imwrite(s / "3.tif", image[3].astype(np.float32))
    cases["slice dtypes differ"] = (s, [], [str(s / "3.tif"), "float32", "uint16"])
    s = write_series(tmp / "corrupt", image[:4])
    (s / "1.tif").write_bytes(b"II*\x00garbage, not a TIFF at all")
    cases["corrupt file"] = (s, [], [str(s / "1.tif"), "not a readable TIFF file"])
    s = write_series(tmp / "truncated", image[:4])
    data = (s / "2.tif").read_bytes()
    (s / "2.tif").write_bytes(data[: len(data) - 100])
    cases["truncated file"] = (s, [], [str(s / "2.tif"), "is truncated"])
    s = write_series(tmp / "truncz", image[:4], compression="zlib", rowsperstrip=4)
    data = (s / "3.tif").read_bytes()
    cut = tifffile.TiffFile(s / "3.tif").pages[0].dataoffsets[2]
    (s / "3.tif").write_bytes(data[:cut] + b"\x00" * (len(data) - cut))  # zeroed strips: corrupt deflate data
    cases["corrupt compressed strips"] = (s, [], [str(s / "3.tif"), "cannot read slice z=3"])
    s = write_series(tmp / "rgb", np.zeros((2, 8, 8, 3), np.uint8))
    cases["rgb slices"] = (s, [], [str(s / "0.tif"), "3 samples per pixel"])
    s = write_series(tmp / "pages", image[:2])
    tifffile.imwrite(s / "2.tif", image[:2])
    cases["multi-page slice in a series"] = (s, [], [str(s / "2.tif"), "has 2 pages"])
    s = write_series(tmp / "ok", image)
    cases["subvol outside"] = (s, ["--subvol", "0,21,0,5,5,5"], ["starts at 0,21,0, outside the image 30,21,7"])
    cases["malformed subvol"] = (s, ["--subvol", "0,0,0,5,5"], ["must have 6 values x0,y0,z0,dx,dy,dz"])
    cases["empty subvol"] = (s, ["--subvol", "0,0,0,5,0,5"], ["must be >= 1"])
    cases["bad chunks"] = (s, ["-c", "16,0,8"], ["chunk size 16,0,8 must have every value >= 1"])
    cases["unknown compression"] = (s, ["--compression", "zstd"], ["compression 'zstd' cannot be used"])
    glob = "must be a non-empty glob of file names inside the input folder, without '/'"
    cases["empty pattern"] = (s, ["--input_name_pattern", ""], ["file name pattern ''", glob])
    cases["absolute pattern"] = (s, ["--input_name_pattern", str(s / "*.tif")], [repr(str(s / "*.tif")), glob])
    cases["pattern with a folder"] = (tmp, ["--input_name_pattern", "ok/*.tif"], ["'ok/*.tif'", glob])
    cases["dataset .."] = (s, ["-d", "../x"], ["dataset path '../x' has a '.' or '..' segment"])
    cases["dataset ."] = (s, ["-d", "."], ["dataset path '.' has a '.' or '..' segment"])
    return cases


BAD = [
    "no file matches", "missing input", "non-integer stem", "two prefixes", "repeated index", "slice shapes differ",
    "slice dtypes differ", "corrupt file", "truncated file", "corrupt compressed strips", "rgb slices",
    "multi-page slice in a series", "subvol outside", "malformed subvol", "empty subvol", "bad chunks",
    "unknown compression", "empty pattern", "absolute pattern", "pattern with a folder", "dataset ..", "dataset .",
]
DURING_CONVERSION = {"corrupt compressed strips"}  # found when the data is decoded, after the headers


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory, image):
    return bad_inputs(tmp_path_factory.mktemp("bad"), image)


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, bad_cases, tmp_path):
    source, extra, needles = bad_cases[case]
    out = tmp_path / "o.n5"
    proc = run_script("tiff_to_n5.py", "-i", source, "-o", out, "-d", "/raw/s0", "-c", "16,8,3", "--no-progress", *extra)
    one_error_line(proc, *needles)
    assert no_dataset_left(out)
    if case not in DURING_CONVERSION:
        # stderr is the error alone (no log line of tifffile's about a corrupt header), and nothing was created
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
        assert not out.exists()


def test_library_errors_are_typed(bad_cases):
    source, _, _ = bad_cases["slice shapes differ"]
    with pytest.raises(TiffError, match="one shape and dtype"):
        open_tiff_stack(source)


def test_progress_lines_without_tqdm(image, tmp_path):
    """The light create-volume image has no tqdm: progress is then plain lines on stderr."""
    write_series(tmp_path / "s", image)
    (tmp_path / "shadow" / "tqdm").mkdir(parents=True)
    (tmp_path / "shadow" / "tqdm" / "__init__.py").write_text("raise ImportError('no tqdm in this image')\n")
    proc = run_script("tiff_to_n5.py", "-i", tmp_path / "s", "-o", tmp_path / "o.n5", "-c", "16,8,3",
                      env={"PYTHONPATH": str(tmp_path / "shadow")}, check=True)
    assert "chunk 18/18 (100%)" in proc.stderr and "18 chunks from 7 TIFF files" in proc.stdout
