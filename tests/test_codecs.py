"""N5 compressions: every name the host passes writes an N5 block Java N5 reads (the right
attributes.json entry, a standard stream); ISA-L gzip/zlib streams are standard both ways."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import zlib

import numcodecs
import numpy as np
import pytest

from exllsm_neuronseg.codecs import (
    COMPRESSION_NAMES,
    IsalGZip,
    IsalZlib,
    compression_name,
    compressor,
    describe,
    install,
)
from exllsm_neuronseg.errors import CompressionError
from exllsm_neuronseg.geometry import Box


@pytest.mark.parametrize("level", [1, 6, 9])
def test_gzip_streams_are_standard(level):
    data = np.random.default_rng(level).random(10_000).astype(">f4")
    encoded = IsalGZip(level).encode(data)
    assert gzip.decompress(encoded) == data.tobytes()
    assert IsalGZip(level).decode(gzip.compress(data.tobytes(), level)) == data.tobytes()
    out = np.empty_like(data)
    IsalGZip(level).decode(encoded, out=out)
    np.testing.assert_array_equal(out, data)


def test_zlib_streams_are_standard():
    data = np.arange(5000, dtype=">u2")
    assert zlib.decompress(IsalZlib(3).encode(data)) == data.tobytes()
    assert IsalZlib(3).decode(zlib.compress(data.tobytes())) == data.tobytes()


def test_n5_chunks_are_readable_without_isal(tmp_path):
    """A chunk written through the ISA-L codec is an N5 gzip block any reader can decode."""
    from exllsm_neuronseg.volume import create_volume

    install()
    data = np.random.default_rng(0).random((8, 6, 4)).astype(np.float32)  # x,y,z
    vol = create_volume(tmp_path / "c.n5", "s0", data.shape, data.shape, "float32")
    vol.write_chunked_zyx(Box((0, 0, 0), data.shape), data.transpose(2, 1, 0))
    raw = (vol.path / "0" / "0" / "0").read_bytes()
    mode, ndim = int.from_bytes(raw[0:2], "big"), int.from_bytes(raw[2:4], "big")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    assert (mode, dims) == (0, [8, 6, 4])
    decoded = np.frombuffer(gzip.decompress(raw[4 + 4 * ndim :]), dtype=">f4").reshape(4, 6, 8)
    np.testing.assert_array_equal(decoded.transpose(2, 1, 0), data)


# The attributes.json "compression" entry Java N5 (n5-viewer, BigDataViewer, n5-spark) parses for
# each of the host's n5_compression names, and the stock decoder of the stream it announces.
N5_ENTRIES = {
    "gzip": ({"type": "gzip", "level": 1, "useZlib": False}, gzip.decompress),
    "raw": ({"type": "raw"}, bytes),
    "bzip2": ({"type": "bzip2", "blockSize": 9}, bz2.decompress),
    "bz2": ({"type": "bzip2", "blockSize": 9}, bz2.decompress),
    "xz": ({"type": "xz", "preset": 6}, lzma.decompress),
    "lzma": ({"type": "xz", "preset": 6}, lzma.decompress),
    "blosc": (
        {"type": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0},
        lambda b: numcodecs.blosc.decompress(b),
    ),
}


@pytest.mark.parametrize("name", list(N5_ENTRIES))
def test_each_compression_round_trips_through_n5(name, tmp_path):
    from exllsm_neuronseg.volume import create_volume, open_volume

    entry, decompress = N5_ENTRIES[name]
    data = (np.arange(20 * 12 * 7).reshape(20, 12, 7) % 251).astype(np.uint16)  # x,y,z
    vol = create_volume(tmp_path / "c.n5", "s0", data.shape, (8, 8, 4), "uint16", compression=name)
    vol.write_chunked_zyx(Box((0, 0, 0), data.shape), data.transpose(2, 1, 0))
    again = open_volume(tmp_path / "c.n5", "s0")
    np.testing.assert_array_equal(again.read(again.box), data)
    attrs = json.loads((vol.path / "attributes.json").read_text())
    assert attrs["compression"] == entry
    # a block is the N5 header + the announced stream of big-endian samples: any reader decodes it
    raw = (vol.path / "1" / "0" / "1").read_bytes()
    ndim = int.from_bytes(raw[2:4], "big")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    block = np.frombuffer(decompress(raw[4 + 4 * ndim :]), ">u2").reshape(dims[::-1])
    np.testing.assert_array_equal(block.transpose(2, 1, 0)[:, :, :3], data[8:16, :8, 4:7])  # z 4..6 in the edge block


def test_compression_levels_and_names():
    assert compressor("gzip", 6).get_config()["level"] == 6 and isinstance(compressor(), IsalGZip)
    assert compressor("GZIP").level == 1 and compressor("raw") is None
    assert compressor("bz2", 3).get_config() == {"id": "bz2", "level": 3}
    assert compressor("xz", 2).get_config()["preset"] == 2
    assert compressor("blosc", 9).get_config()["clevel"] == 9
    assert describe(compressor("bzip2")) == "bzip2 level 9" and describe(None) == "raw"
    assert compression_name("lzma") == "xz" and COMPRESSION_NAMES == ("gzip", "raw", "bzip2", "xz", "blosc")


@pytest.mark.parametrize(
    "name, level, message",
    [
        ("zstd", None, r"'zstd' cannot be used: zarr 2.18's N5 format has no zstd mapping.*allowed: gzip, raw, bzip2, xz, blosc"),
        ("lz4", None, r"'lz4' cannot be used.*allowed: gzip, raw"),
        ("snappy", None, r"unknown compression 'snappy'; allowed: gzip, raw, bzip2, xz, blosc"),
        ("gzip", 0, r"gzip compression level 0 is not in 1..9"),
        ("bzip2", 10, r"bzip2 compression level 10 is not in 1..9"),
        ("raw", 1, r"compression raw takes no level \(got 1\)"),
    ],
)
def test_bad_compressions_are_named(name, level, message, tmp_path):
    from exllsm_neuronseg.volume import create_volume

    with pytest.raises(CompressionError, match=message):
        compressor(name, level)
    with pytest.raises(CompressionError, match=message):
        create_volume(tmp_path / "c.n5", "s0", (8, 8, 8), (4, 4, 4), "uint8", compression=name, compression_level=level)
    assert not (tmp_path / "c.n5").exists()  # nothing created
