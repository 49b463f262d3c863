"""ISA-L gzip/zlib codecs write standard streams that stock readers decode, and vice versa."""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import pytest

from exllsm_neuronseg.codecs import IsalGZip, IsalZlib, install
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
