"""TIFF input: a folder of z slices, or one multi-page (Big)TIFF, converted to an N5 dataset in x,y,z.

This is the host pipeline's ``tiff_to_n5`` step (host contract 2.2) with its flags and defaults,
and these differences on purpose:

* **Slice order.** Slices are sorted by the integer at the end of the file name's stem: ``2.tif``
  before ``12.tif``, and ``slice_0002.tif`` before ``slice_0012.tif``. The host sorts by
  ``int(stem)``, which this extends to names with a common prefix; a stem without a trailing integer,
  two different prefixes, or one index twice is an error naming the files. Gaps in the indices
  (0, 1, 5, 9) are stacked as consecutive z, as the host does, with one warning.
* **Axis order.** The N5 ``blockSize`` is the chunk size as given, x,y,z (the host handed it to zarr
  in z,y,x order, so an anisotropic block size landed reversed).
* **Memory.** Each output chunk reads only the part of each slice it needs: uncompressed slices
  are memory-mapped and only the chunk's rows are touched; compressed or tiled slices decode only the
  strips or tiles that meet the chunk. Memory does not grow with the slice area; chunks in flight are
  limited by ``memory_limit``.
* **No half-written output.** Every slice header (shape, dtype, compression, data inside the file)
  is checked before anything is created; the dataset is written under a temporary sibling name in
  the container and renamed into place when complete, so the target path never holds a partial
  conversion. The dataset records its source (a digest of the file names, sizes and mtimes), chunks,
  compression and region; a re-run of the same conversion is skipped, another dataset at the target
  is replaced only when asked to, and a target that is the input, holds it or lies inside it never.
* **Voxel size.** ImageJ-calibrated TIFFs (``unit`` and ``spacing`` in the ImageJ description,
  X/YResolution tags) give N5 ``pixelResolution`` ``{"dimensions": [x,y,z], "unit": ...}`` and
  ``resolution`` [x,y,z].
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import codecs
from .errors import NeuronSegError, OutputError, OutputExistsError, TiffError, VolumeError
from .geometry import XYZ, Box, format_xyz, grid_cells, parse_xyz, processed_region
from .provenance import ATTRIBUTE as PROVENANCE
from .provenance import stage_record
from .volume import (
    Volume,
    check_not_inside_a_dataset,
    create_volume,
    discard_dataset,
    discard_leftovers,
    io_executor,
    io_thread_count,
    normalise_dataset_path,
    open_volume,
)

log = logging.getLogger(__name__)

DEFAULT_PATTERN = "*.tif"
DEFAULT_CHUNKS: XYZ = (512, 512, 512)
# Chunks in flight are limited so that their buffers fit in this many bytes (see COPIES_PER_CHUNK).
DEFAULT_MEMORY_LIMIT = 1_500_000_000
# Peak bytes of a chunk being encoded, in chunk sizes: the chunk read from the TIFFs (swapped to
# big-endian in place, Volume.write_chunk) and its compressed stream (up to a little over the raw
# size for incompressible data).
COPIES_PER_CHUNK = 2.5
ATTRIBUTE = "tiffToN5"  # the conversion record in the dataset's attributes.json
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")
_SLICE_NAME = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)$")


class _QuietTifffile:
    """The 'tifffile' logger silenced while any thread reads TIFFs (counted, so that threads nest)."""

    lock = threading.Lock()
    users = 0
    level = logging.NOTSET


@contextlib.contextmanager
def quiet_tifffile():
    """Silence tifffile's log inside the block.

    tifffile logs what it finds wrong in a file (``<tifffile.TiffPages @8> invalid offset ...``) as
    well as raising; the :class:`TiffError` raised here names the file and that cause, so its log
    would only repeat it on another line.
    """
    logger = logging.getLogger("tifffile")
    with _QuietTifffile.lock:
        if _QuietTifffile.users == 0:
            _QuietTifffile.level = logger.level
            logger.setLevel(logging.CRITICAL + 1)
        _QuietTifffile.users += 1
    try:
        yield
    finally:
        with _QuietTifffile.lock:
            _QuietTifffile.users -= 1
            if _QuietTifffile.users == 0:
                logger.setLevel(_QuietTifffile.level)


@dataclass(frozen=True)
class _Layout:
    """How the data of slices with the same TIFF layout is stored and decoded."""

    dtype: np.dtype  # in the file's byte order
    decode: Callable | None  # tifffile's segment decoder; None: uncompressed rows read in place
    segment: tuple[int, int] = (0, 0)  # rows, columns of one strip or tile
    across: int = 1  # strips or tiles per row of them
    jpegtables: bytes | None = None


@dataclass(frozen=True)
class _Slice:
    file: int  # index into TiffStack.files
    offsets: np.ndarray  # of its strips or tiles (one offset: uncompressed rows, contiguous)
    bytecounts: np.ndarray
    layout: object  # key into TiffStack.layouts


@dataclass
class TiffStack:
    """A validated TIFF series in x,y,z: a folder of single-page slices or one multi-page file."""

    source: Path
    files: list[Path]
    shape: XYZ
    dtype: np.dtype
    slices: list[_Slice] = field(repr=False)
    layouts: dict = field(repr=False)
    voxel_size: tuple[float, float, float] | None = None
    unit: str | None = None

    @property
    def multipage(self) -> bool:
        return len(self.files) == 1 and self.shape[2] > 1

    def resolution_attributes(self) -> dict:
        """N5 ``pixelResolution`` and ``resolution`` (x,y,z) when the TIFFs give a voxel size."""
        if self.voxel_size is None:
            return {}
        size = [float(v) for v in self.voxel_size]
        return {"pixelResolution": {"dimensions": size, "unit": self.unit or "pixel"}, "resolution": size}

    def read_zyx(self, box: Box, out: np.ndarray) -> None:
        """Read ``box`` (inside the stack) into the z,y,x array ``out``, slice by slice."""
        (x0, y0, z0), (x1, y1, z1) = box.start, box.end
        self.read_columns(y0, y1, z0, z1, [(x0, x1, out)])

    def read_columns(self, y0: int, y1: int, z0: int, z1: int, targets: Sequence[tuple[int, int, np.ndarray]]) -> None:
        """Read rows ``[y0, y1)`` of slices ``[z0, z1)`` into several x ranges at once.

        ``targets`` holds ``(x0, x1, out)`` with ``out`` a z,y,x array of shape
        ``(z1 - z0, y1 - y0, x1 - x0)``. Each strip or tile is decoded once for all of them.
        """
        handles: dict[int, object] = {}
        with quiet_tifffile():
            try:
                for z in range(z0, z1):
                    sl = self.slices[z]
                    if sl.file not in handles:
                        if len(handles) > 4:  # series: one file per slice; keep only a few open
                            for h in handles.values():
                                h.close()  # type: ignore[attr-defined]
                            handles.clear()
                        handles[sl.file] = open(self.files[sl.file], "rb")  # noqa: SIM115 - closed below
                    try:
                        self._read_rows(sl, handles[sl.file], y0, y1, [(a, b, out[z - z0]) for a, b, out in targets])
                    except MemoryError:
                        raise
                    except Exception as exc:  # decoders of damaged data raise anything (zlib.error, ...)
                        raise TiffError(f"{self.files[sl.file]}: cannot read slice z={z} ({type(exc).__name__}: {exc})") from exc
            finally:
                for h in handles.values():
                    h.close()  # type: ignore[attr-defined]

    def _read_rows(self, sl: _Slice, fh, y0: int, y1: int, targets: list[tuple[int, int, np.ndarray]]) -> None:
        layout: _Layout = self.layouts[sl.layout]
        width = self.shape[0]
        if layout.decode is None:
            # Only the chunk's rows are mapped, and only the pages holding its columns are read.
            rows = np.memmap(
                fh, dtype=layout.dtype, mode="r", offset=int(sl.offsets[0]) + y0 * width * layout.dtype.itemsize,
                shape=(y1 - y0, width),
            )
            for x0, x1, out in targets:
                out[...] = rows[:, x0:x1]
            del rows
            return
        fd = fh.fileno()
        seg_rows, seg_cols = layout.segment
        left_edge, right_edge = min(t[0] for t in targets), max(t[1] for t in targets)
        for r in range(y0 // seg_rows, (y1 - 1) // seg_rows + 1):
            for c in range(left_edge // seg_cols, (right_edge - 1) // seg_cols + 1):
                index = r * layout.across + c
                count = int(sl.bytecounts[index])
                data = os.pread(fd, count, int(sl.offsets[index])) if count else None
                if data is not None and len(data) < count:
                    raise ValueError(f"the file ends inside strip/tile {index}: truncated")
                segment, _, shape = layout.decode(data, index, jpegtables=layout.jpegtables)
                top, left = r * seg_rows, c * seg_cols
                a0, a1 = max(y0, top), min(y1, top + shape[1])
                plane = None if segment is None else segment.reshape(shape)[0, :, :, 0]
                for x0, x1, out in targets:
                    b0, b1 = max(x0, left), min(x1, left + shape[2])
                    if b0 >= b1:
                        continue
                    target = out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
                    if plane is None:  # an empty strip or tile: TIFF readers fill it with 0
                        target[...] = 0
                    else:
                        target[...] = plane[a0 - top : a1 - top, b0 - left : b1 - left]


@dataclass
class TiffConversion:
    """What :func:`tiff_to_n5` did."""

    volume: Volume
    files: int  # TIFF files read (or that would have been)
    region: Box | None  # the part of the image written (None when skipped)
    chunks_written: int = 0
    seconds: float = 0.0
    bytes_read: int = 0  # raw (uncompressed) bytes of the region
    skipped: bool = False  # the target was this conversion already

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e6 if self.seconds > 0 else 0.0


# ---- finding and validating the slices -------------------------------------------------------


def find_tiffs(input: str | Path, pattern: str = DEFAULT_PATTERN) -> list[Path]:
    """The TIFF files of ``input`` in z order: a file alone, or a folder's files matching ``pattern``.

    Slices are sorted by the integer that ends their stem (``2.tif`` < ``12.tif``,
    ``slice_0002.tif`` < ``slice_0012.tif``). A folder with one matching file is that file
    (multi-page or not). Indices with gaps (0, 1, 5, 9) are stacked as consecutive z, with one
    warning naming the first gap. Raises :class:`TiffError` for a pattern that is not a glob of file
    names, a missing input, no match, a stem without a trailing integer, different prefixes or a
    repeated index.
    """
    check_pattern(pattern)
    path = Path(input)
    if path.is_file():
        return [path]
    if not path.exists():
        raise TiffError(f"TIFF input {path} does not exist (expected a folder of slices or a multi-page TIFF file)")
    if not path.is_dir():
        raise TiffError(f"TIFF input {path} is neither a file nor a folder")
    files = [p for p in path.glob(pattern) if p.is_file()]
    if not files:
        others = sorted(p.name for p in path.iterdir() if p.is_file())
        hint = f" (it holds {len(others)} file{'s' * (len(others) != 1)}, e.g. {others[0]})" if others else " (it is empty)"
        raise TiffError(f"no file in {path} matches the pattern {pattern!r}{hint}")
    if len(files) == 1:
        return files
    keyed = []
    for f in files:
        m = _SLICE_NAME.match(f.stem)
        if m is None:
            raise TiffError(
                f"slice {f} has no z index: its name must end in an integer (0.tif, 12.tif, slice_0012.tif); "
                f"choose the slices with a pattern that leaves out other files"
            )
        keyed.append((m["prefix"], int(m["index"]), f))
    prefixes = {}
    for prefix, _, f in keyed:
        prefixes.setdefault(prefix, f)
    if len(prefixes) > 1:
        (p1, f1), (p2, f2) = list(prefixes.items())[:2]
        raise TiffError(
            f"slices {f1.name} and {f2.name} have different name prefixes ({p1!r}, {p2!r}), so their z order is "
            "ambiguous; all slices must be <prefix><integer>, e.g. slice_0001.tif; narrow the pattern to one series"
        )
    keyed.sort(key=lambda k: k[1])
    for (_, i, a), (_, j, b) in itertools.pairwise(keyed):
        if i == j:
            raise TiffError(f"slices {a} and {b.name} have the same z index {i}")
    _warn_about_gaps(keyed)
    return [f for _, _, f in keyed]


def check_pattern(pattern: str) -> None:
    """A slice pattern is a non-empty relative glob of file names in the input folder (no '/')."""
    if not isinstance(pattern, str) or not pattern or "/" in pattern or os.sep in pattern:
        raise TiffError(
            f"file name pattern {pattern!r} cannot select slices: it must be a non-empty glob of file names "
            "inside the input folder, without '/' (e.g. '*.tif' or 'slice_*.tiff')"
        )


def _warn_about_gaps(keyed: Sequence[tuple[str, int, Path]]) -> None:
    """One warning when the sorted slice indices skip numbers (they are stacked as consecutive z)."""
    missing = keyed[-1][1] - keyed[0][1] + 1 - len(keyed)
    if missing <= 0:
        return
    (_, i, a), (_, j, b) = next(pair for pair in itertools.pairwise(keyed) if pair[1][1] - pair[0][1] > 1)
    log.warning(
        "slice indices are not consecutive: %s (index %d) is followed by %s (index %d), and %d of the indices "
        "%d..%d %s missing; the %d slices are stacked as consecutive z",
        a.name, i, b.name, j, missing, keyed[0][1], keyed[-1][1], "are" if missing != 1 else "is", len(keyed),
    )


def source_record(files: Sequence[Path]) -> dict:
    """The listing that identifies a conversion's input: file count, first and last name, and a
    SHA-256 of every file's name, size and mtime."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"files": len(files), "first": files[0].name, "last": files[-1].name, "listingSha256": h.hexdigest()}


def open_tiff_stack(input: str | Path, pattern: str = DEFAULT_PATTERN, files: Sequence[Path] | None = None) -> TiffStack:
    """Find the slices (:func:`find_tiffs`) and validate every header; reads no image data.

    Every slice must be one grayscale 2-D image of the same shape and dtype, stored inside its file,
    with a compression this installation can decode. Raises :class:`TiffError` naming the file.
    """
    import tifffile

    files = list(files) if files is not None else find_tiffs(input, pattern)
    slices: list[_Slice] = []
    layouts: dict = {}
    first: tuple[tuple[int, int], np.dtype, Path] | None = None
    voxel_size, unit = None, None
    for k, path in enumerate(files):
        try:
            with quiet_tifffile(), tifffile.TiffFile(path) as tif:
                pages = _stack_pages(tif, path, single=len(files) == 1)
                size = path.stat().st_size
                for offsets, counts, keyframe in pages:
                    shape, dtype = _check_page(keyframe, path)
                    if first is None:
                        first = (shape, dtype, path)
                        voxel_size, unit = _voxel_size(tif, keyframe)
                    elif (shape, dtype) != first[:2]:
                        raise TiffError(
                            f"slice {path} is {shape[1]}x{shape[0]} (x,y) {dtype}, but {first[2]} is "
                            f"{first[0][1]}x{first[0][0]} {first[1]}: all slices must have one shape and dtype"
                        )
                    key = _layout_key(tif, keyframe, offsets, counts)
                    end = int((offsets + counts).max()) if len(offsets) else 0
                    if key[0] == "rows":  # read in place: the whole image must lie in the file
                        end = max(end, int(offsets[0]) + shape[0] * shape[1] * dtype.itemsize)
                    if end > size:
                        raise TiffError(f"{path} is truncated: its image data ends at byte {end}, the file has {size} bytes")
                    if key not in layouts:
                        layouts[key] = _make_layout(tif, keyframe, key)
                    slices.append(_Slice(k, offsets, counts, key))
        except NeuronSegError:
            raise
        except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, struct.error) as exc:
            raise TiffError(f"{path} is not a readable TIFF file ({type(exc).__name__}: {exc})") from exc
    assert first is not None
    (height, width), dtype, _ = first
    source = Path(input) if input is not None else files[0].parent
    return TiffStack(source, files, (width, height, len(slices)), dtype, slices, layouts, voxel_size, unit)


def _segments(page) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64)


def _stack_pages(tif, path: Path, single: bool) -> list[tuple]:
    """(offsets, bytecounts, page with the tags) per z slice of one file."""
    from tifffile import TiffPage

    if len(tif.pages) == 0:
        raise TiffError(f"{path} is not a readable TIFF file (it has no image directory)")
    if not single:
        if len(tif.pages) != 1:
            raise TiffError(
                f"{path} has {len(tif.pages)} pages: slices in a folder must be single-page TIFFs "
                "(give a multi-page TIFF alone, as the input file itself)"
            )
        page = tif.pages[0]
        return [(*_segments(page), page)]
    series = tif.series[0]
    shape, axes = tuple(series.shape), series.axes
    if len(shape) == 2:
        shape, axes = (1, *shape), "Z" + axes
    if len(shape) != 3 or axes[-2:] != "YX":
        raise TiffError(
            f"{path} holds a {len(shape)}-D image of shape {shape} (axes {axes}): only single-channel z stacks "
            "(z,y,x) can be converted"
        )
    keyframe = series.keyframe
    pages = [p for p in series.pages if p is not None]
    if len(pages) == shape[0]:
        if len(tif.pages) > len(pages):
            raise TiffError(
                f"{path} has {len(tif.pages)} pages, but only {len(pages)} of them form a stack of one shape and "
                "dtype: every page must be a z slice of the same shape and dtype"
            )
        return [(*_segments(p), p if isinstance(p, TiffPage) else p.keyframe) for p in pages]
    if len(tif.pages) == 1 and series.dataoffset is not None:
        # ImageJ hyperstack > 4 GB: one image directory, the slices stored back to back after it
        nbytes = math.prod(shape[1:]) * keyframe.dtype.itemsize
        offsets = series.dataoffset + nbytes * np.arange(shape[0], dtype=np.int64)
        return [(offsets[z : z + 1], np.asarray([nbytes], np.int64), keyframe) for z in range(shape[0])]
    raise TiffError(f"{path}: only {len(pages)} of its {shape[0]} z slices have an image directory")


def _check_page(page, path: Path) -> tuple[tuple[int, int], np.dtype]:
    if page.samplesperpixel != 1:
        raise TiffError(f"{path} has {page.samplesperpixel} samples per pixel (RGB?): only grayscale slices can be converted")
    if getattr(page, "imagedepth", 1) != 1:
        raise TiffError(f"{path} holds volumetric pages (depth {page.imagedepth}): only 2-D pages can be converted")
    if page.dtype is None or np.dtype(page.dtype).name not in DTYPES:
        raise TiffError(
            f"{path} has {page.bitspersample}-bit samples of format {page.sampleformat}: supported dtypes are {', '.join(DTYPES)}"
        )
    if page.compression != 1:
        from tifffile import TIFF

        try:
            TIFF.DECOMPRESSORS[page.compression]
        except KeyError as exc:
            need = str(exc).strip("'\"")
            raise TiffError(f"{path} is compressed with {page.compression.name}, which cannot be decoded here: {need}") from None
    return (int(page.imagelength), int(page.imagewidth)), np.dtype(page.dtype)


def _layout_key(tif, page, offsets: np.ndarray, counts: np.ndarray):
    rows_in_place = (
        page.compression == 1
        and page.predictor == 1
        and page.fillorder == 1
        and not page.is_tiled
        and page.bitspersample in (8, 16, 32, 64)
        and (len(offsets) == 1 or bool(np.all(offsets[:-1] + counts[:-1] == offsets[1:])))
        and int(counts.sum()) >= page.imagelength * page.imagewidth * page.bitspersample // 8
    )
    return ("rows", tif.byteorder) if rows_in_place else ("decode", page.hash)


def _make_layout(tif, page, key) -> _Layout:
    dtype = np.dtype(page.dtype).newbyteorder(tif.byteorder)
    if key[0] == "rows":
        return _Layout(dtype, None)
    page.decode  # noqa: B018 - tifffile: create the decoder before threads use it
    rows, cols = (int(page.tilelength), int(page.tilewidth)) if page.is_tiled else (int(page.rowsperstrip), int(page.imagewidth))
    rows = min(rows, int(page.imagelength)) or int(page.imagelength)
    across = -(-int(page.imagewidth) // cols)
    return _Layout(dtype, page.decode, (rows, cols), across, page.jpegtables)


_MICRONS = {"micron", "microns", "um", "µm", "μm", "\\u00b5m", "micrometer", "micrometre"}


def _voxel_size(tif, page) -> tuple[tuple[float, float, float] | None, str | None]:
    """x,y from X/YResolution and z from ImageJ's ``spacing``, in ImageJ's ``unit``; None if any is missing."""
    ij = tif.imagej_metadata or {}
    unit = ij.get("unit")
    if not unit or str(unit).lower() in ("pixel", "pixels"):
        return None, None
    unit = "um" if str(unit).lower() in _MICRONS else str(unit)
    try:
        xres, yres = page.tags["XResolution"].value, page.tags["YResolution"].value
        x, y = xres[1] / xres[0], yres[1] / yres[0]
    except (KeyError, ZeroDivisionError, TypeError, IndexError):
        return None, None
    z = ij.get("spacing")
    if z is None:
        log.info("the TIFFs give a pixel size of %g,%g %s but no z spacing: no voxel size recorded", x, y, unit)
        return None, None
    return (x, y, float(z)), unit


# ---- the conversion --------------------------------------------------------------------------


def chunk_boxes(region: Box, chunks: XYZ, shape: XYZ) -> list[Box]:
    """The chunks (cut at the image edge) that meet ``region``, in storage order (x fastest)."""
    start = tuple(s // c * c for s, c in zip(region.start, chunks, strict=True))
    end = tuple(min(-(-e // c) * c, n) for e, c, n in zip(region.end, chunks, shape, strict=True))
    return grid_cells(Box(start, end), chunks)  # type: ignore[arg-type]


def subvol_record(region: Box, shape: XYZ) -> list[int] | None:
    """The region written, as the record keeps it: x0,y0,z0,dx,dy,dz; None for the whole image."""
    return None if region == Box((0, 0, 0), shape) else [*region.start, *region.shape]


def _temporary_name(dataset: str) -> str:
    parent, _, leaf = dataset.rpartition("/")
    return f"{parent}/.{leaf}.tiff_to_n5.partial" if parent else f".{leaf}.tiff_to_n5.partial"


def _check_apart_from_input(input: str | Path, container: str, paths: Sequence[str]) -> None:
    """Refuse output paths (the target dataset, its temporary) that are the TIFF input, contain it or
    lie inside it, links resolved: replacing or discarding them would delete the source files."""
    source = Path(input).resolve()
    for name in paths:
        target = (Path(container) / name).resolve()
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise OutputError(
            f"output dataset {container}:/{name} ({target}) {relation} the TIFF input {source}: writing it could "
            "delete the TIFF files; the output dataset must be a directory apart from the input, neither it, "
            "inside it nor containing it"
        )


def _existing(container: str, dataset: str) -> tuple[bool, Volume | None]:
    """(something is at the target path, the 3-D dataset there or None when it is not one)."""
    path = Path(container) / dataset
    if not (path.exists() or path.is_symlink()):
        return False, None
    try:
        return True, open_volume(container, dataset)
    except VolumeError:
        return True, None


def _record_of(volume: Volume | None) -> dict | None:
    """The conversion record of a dataset (N5 attributes.json or zarr .zattrs); None if it has none."""
    if volume is None:
        return None
    try:
        record = volume.array.attrs.get(ATTRIBUTE)  # type: ignore[attr-defined]
    except (OSError, ValueError, KeyError):
        return None
    return record if isinstance(record, dict) else None


def _replace(container: str, temporary: str, dataset: str) -> None:
    """Move the finished temporary dataset to the target path, replacing the dataset there.

    The old dataset is discarded first (:func:`volume.discard_dataset`: renamed away in one step,
    then deleted), then the temporary is renamed into place. Killed in between, the target holds no
    dataset and the next run converts again (discarding the temporary it finds).
    """
    src, dst = Path(container) / temporary, Path(container) / dataset
    discard_leftovers(dst)  # of a replacement killed while deleting
    if dst.exists():
        discard_dataset(dst)
    os.rename(src, dst)


def tiff_to_n5(
    input: str | Path,
    container: str | Path,
    dataset: str = "s0",
    chunks: XYZ = DEFAULT_CHUNKS,
    pattern: str = DEFAULT_PATTERN,
    subvol: str | Sequence[int] | None = None,
    compression: str = "gzip",
    compression_level: int | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    progress: Callable[[int, int], None] | None = None,
) -> TiffConversion:
    """Convert a TIFF series (folder of slices, or one multi-page file) into an N5 (or zarr) dataset.

    Args:
        input: a folder of z slices (files matching ``pattern``) or one multi-page TIFF file.
        container, dataset: the output, created if missing (N5 unless the container is named *.zarr).
            The dataset directory must not be the input, contain it or lie inside it.
        chunks: the chunk size (N5 ``blockSize``), x,y,z.
        pattern: a glob of file names in the input folder (no '/').
        subvol: ``"x0,y0,z0,dx,dy,dz"`` (or those 6 integers; :func:`geometry.processed_region`): the
            full-size dataset is created but only this region (clipped to the image) is written, as
            the host does; it must start inside.
        compression, compression_level: an N5 compression name and level (:func:`codecs.compressor`).
        overwrite: replace a target dataset that is not this very conversion (a group or anything
            that is not a 3-D dataset is never replaced).
        threads: chunk reading/encoding threads (default: :func:`volume.default_io_threads`; at most
            :func:`volume.max_io_threads`).
        memory_limit: bytes for the chunks in flight (``COPIES_PER_CHUNK`` chunk sizes for each one
            being encoded, one for each read ahead); at least one chunk is always in flight.
        progress: called with (chunks done, chunks total) after each chunk; whatever it raises stops
            the conversion (the temporary dataset is removed).

    Returns:
        A :class:`TiffConversion`; ``skipped`` when the target already holds this conversion.

    Raises:
        TiffError, GeometryError, CompressionError, VolumeError: bad input (nothing is created);
        OutputExistsError: the target exists and is another conversion, and ``overwrite`` is false;
        OutputError: the target is (or holds, or lies in) the input, is not a dataset, lies inside
            another dataset, or cannot be written.
    """
    from zarr.n5 import compressor_config_to_n5

    t0 = time.perf_counter()
    codec = codecs.compressor(compression, compression_level)
    chunks = parse_xyz(chunks, "chunk size", minimum=1)
    container, dataset = str(container), normalise_dataset_path(dataset)
    if not dataset:
        raise OutputError("an output dataset path inside the container is required (e.g. /s0)")
    files = find_tiffs(input, pattern)
    temporary = _temporary_name(dataset)
    _check_apart_from_input(input, container, (dataset, temporary))
    check_not_inside_a_dataset(container, dataset)
    record = {
        "input": str(Path(input).resolve()),
        "pattern": pattern,
        **source_record(files),
        "blockSize": list(chunks),
        "compression": compressor_config_to_n5(codec.get_config() if codec else None),
    }
    exists, target = _existing(container, dataset)
    existing = _record_of(target)
    if target is not None and existing is not None and {k: v for k, v in existing.items() if k != "subvol"} == record:
        # the same files: the dataset has the image's shape, so the region can be found without the headers
        if existing.get("subvol") == subvol_record(processed_region(subvol, target.shape), target.shape):
            log.info("%s is already this conversion of %d TIFF files: nothing to do", target, len(files))
            return TiffConversion(target, len(files), None, skipped=True, seconds=time.perf_counter() - t0)

    stack = open_tiff_stack(input, files=files)
    region = processed_region(subvol, stack.shape)
    record["subvol"] = subvol_record(region, stack.shape)
    if exists:
        where = f"{container}:/{dataset}"
        if target is None or Path(container, dataset).is_symlink():
            raise OutputError(
                f"{where} exists and is not a 3-D dataset (a group, a link or another folder): it is never "
                "replaced; choose another dataset path"
            )
        if not overwrite:
            why = "was converted with other settings or from other files" if existing else "was not made by this conversion"
            raise OutputExistsError(f"{where} already exists and {why}; replace it explicitly or choose another dataset")
    boxes = chunk_boxes(region, chunks, stack.shape)
    if (Path(container) / temporary).exists():  # a leftover of a killed conversion: never reused
        discard_dataset(Path(container) / temporary)
    volume = create_volume(
        container, temporary, stack.shape, chunks, stack.dtype,
        attributes={**stack.resolution_attributes(), PROVENANCE: stage_record("tiff_to_n5", record)},
        compression=compression, compression_level=compression_level,
    )
    log.info(
        "converting %d TIFF %s (%s, %s) into %s:/%s: %d chunks of %s",
        len(files), "file" if len(files) == 1 else "slices", format_xyz(stack.shape), stack.dtype,
        container, dataset, len(boxes), format_xyz(chunks),
    )
    try:
        _convert(stack, volume, region, boxes, threads, memory_limit, progress)
        volume.array.attrs[ATTRIBUTE] = record
        _replace(container, temporary, dataset)
    except BaseException:
        shutil.rmtree(volume.path, ignore_errors=True)
        raise
    volume = open_volume(container, dataset)
    return TiffConversion(
        volume, len(files), region, len(boxes), time.perf_counter() - t0, region.size * stack.dtype.itemsize
    )


def _group_size(stack: TiffStack, chunks: XYZ, chunk_bytes: int, memory_limit: int) -> int:
    """Chunks of one row read together: strips (or tiles) wider than a chunk are then decoded once
    for the group instead of once per chunk, if the memory allows the group next to one encoding."""
    wide = any(lay.decode is not None and lay.segment[1] > chunks[0] for lay in stack.layouts.values())
    across = -(-stack.shape[0] // chunks[0])
    if not wide:
        return 1
    return max(1, min(across, int((memory_limit - COPIES_PER_CHUNK * chunk_bytes) // chunk_bytes)))


def _convert(stack: TiffStack, volume: Volume, region: Box, boxes: list[Box], threads, memory_limit, progress) -> None:
    """Read chunks (a row of them together where strips span them; z slices split over the reading
    threads) while earlier chunks are encoded and written by others; what is alive fits ``memory_limit``."""
    chunk_bytes = math.prod(volume.chunks) * stack.dtype.itemsize
    threads = io_thread_count(threads)  # capped, with one line, at max_io_threads()
    group = _group_size(stack, volume.chunks, chunk_bytes, memory_limit)
    rows: list[list[Box]] = []
    for box in boxes:  # storage order: the chunks of a row are consecutive
        if rows and rows[-1][-1].start[1:] == box.start[1:]:
            rows[-1].append(box)
        else:
            rows.append([box])
    groups: list[list[Box]] = []
    for row in rows:  # as few groups per row as the size allows, of even sizes
        size = -(-len(row) // -(-len(row) // group))
        groups += [row[k : k + size] for k in range(0, len(row), size)]
    encoding_bytes = COPIES_PER_CHUNK * chunk_bytes
    if encoding_bytes * min(threads, len(boxes)) + chunk_bytes > memory_limit:
        log.info(
            "%d MB chunks, read %d at a time: the memory limit of %d MB bounds the chunks in flight",
            chunk_bytes // 10**6, group, memory_limit // 10**6,
        )
    readers, writers = io_executor(threads), io_executor(threads)

    def read(boxes: list[Box]) -> list[np.ndarray]:
        buffers, targets = [], []
        for box in boxes:
            part = box.intersect(region)
            data = np.zeros(box.shape[::-1], stack.dtype) if part != box else np.empty(box.shape[::-1], stack.dtype)
            buffers.append(data)
            targets.append((part.start[0], part.end[0], data[part.slices(box.start)[::-1]]))
        part = boxes[0].intersect(region)
        (y0, z0), (y1, z1) = part.start[1:], part.end[1:]
        cuts = sorted({int(c) for c in np.linspace(z0, z1, min(threads, z1 - z0) + 1)})
        slabs = [
            readers.submit(stack.read_columns, y0, y1, a, b, [(x0, x1, out[a - z0 : b - z0]) for x0, x1, out in targets])
            for a, b in itertools.pairwise(cuts)
        ]
        for f in slabs:
            f.result()
        return buffers

    pending: set[Future] = set()
    done = 0

    def harvest() -> None:
        nonlocal pending, done
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in finished:
            f.result()
            done += 1
            if progress:
                progress(done, len(boxes))

    try:
        for members in groups:
            while pending and len(pending) * encoding_bytes + len(members) * chunk_bytes > memory_limit:
                harvest()
            buffers = read(members)
            for k, box in enumerate(members):
                waiting = (len(members) - k - 1) * chunk_bytes  # read, not yet handed to an encoder
                while pending and (
                    len(pending) >= threads or (len(pending) + 1) * encoding_bytes + waiting > memory_limit
                ):
                    harvest()
                pending.add(writers.submit(volume.write_chunk, box.start, buffers[k]))
                buffers[k] = None  # only the write task holds the chunk now
        while pending:
            harvest()
    finally:
        for f in pending:
            f.cancel()
        readers.shutdown(wait=True)
        writers.shutdown(wait=True)
