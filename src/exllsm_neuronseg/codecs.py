"""Faster gzip and zlib for N5/zarr chunks, through Intel ISA-L (the ``isal`` package).

N5 stores gzip (or zlib) streams; any deflate encoder produces a stream every reader accepts.
ISA-L encodes float32 probability chunks about 10x faster than zlib at the same ratio and
decodes about 2x faster (measured on 128^3 chunks: 495 vs 49 MB/s encode, 975 vs 401 MB/s
decode), which matters because every block writes ~0.5 GB of probabilities.
:func:`install` registers these codecs under numcodecs' ``gzip`` and ``zlib`` ids, so zarr's
N5 store uses them for every dataset opened afterwards.  Streams stay standard: data written
here is read by Java N5, zarr with stock numcodecs, and ``gzip -d``.
"""

from __future__ import annotations

import numcodecs
from numcodecs.compat import ensure_bytes, ensure_contiguous_ndarray
from numcodecs.registry import register_codec


def _isal_level(zlib_level: int) -> int:
    """ISA-L has levels 0..3; map zlib's 1..9 onto them (0 would be larger than the input)."""
    if zlib_level is None or zlib_level < 0:
        return 2
    return 1 if zlib_level <= 1 else 2 if zlib_level <= 5 else 3


def _into(data: bytes, out):
    if out is None:
        return data
    view = ensure_contiguous_ndarray(out).view("u1").reshape(-1)
    if view.nbytes != len(data):
        raise ValueError(f"decoded chunk has {len(data)} bytes, the output buffer {view.nbytes}")
    view[:] = memoryview(data)
    return out


class IsalGZip(numcodecs.GZip):
    """numcodecs ``gzip`` codec with ISA-L inside (same stream format)."""

    def encode(self, buf):
        from isal import igzip

        return igzip.compress(ensure_contiguous_ndarray(buf), _isal_level(self.level), mtime=0)

    def decode(self, buf, out=None):
        from isal import igzip

        return _into(igzip.decompress(ensure_bytes(buf)), out)


class IsalZlib(numcodecs.Zlib):
    """numcodecs ``zlib`` codec with ISA-L inside (same stream format)."""

    def encode(self, buf):
        from isal import isal_zlib

        return isal_zlib.compress(ensure_contiguous_ndarray(buf), _isal_level(self.level))

    def decode(self, buf, out=None):
        from isal import isal_zlib

        return _into(isal_zlib.decompress(ensure_bytes(buf)), out)


_installed = False


def install() -> None:
    """Use the ISA-L codecs for ``gzip`` and ``zlib`` from now on (idempotent)."""
    global _installed
    if not _installed:
        register_codec(IsalGZip, "gzip")
        register_codec(IsalZlib, "zlib")
        _installed = True
