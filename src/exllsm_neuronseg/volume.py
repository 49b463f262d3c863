"""Volume I/O for N5 and zarr v2 datasets, in x,y,z coordinates.

A dataset is named the way the host pipeline names it: a *container* path plus a *dataset* path
inside it (``-i /data/x.n5 -id /c1/s0``).  zarr exposes N5 arrays as z,y,x; this module
converts at its boundary so that every caller sees x,y,z.

Writes go chunk by chunk through a thread pool (gzip encoding releases the GIL), and zarr's
directory stores write each chunk to a temporary file and rename it, so a chunk on disk is either
the old one or the new one, never half of each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import codecs, testhook
from .errors import ChunkError, InputValueError, NeuronSegError, OutputError, OutputExistsError, ParameterError, VolumeError
from .resources import cpus
from .geometry import XYZ, Box, format_xyz, grid_cells, reflect_index

log = logging.getLogger(__name__)
codecs.install()  # ISA-L gzip/zlib: same streams, ~10x faster encoding

# Attributes carried from the input dataset to outputs (N5 viewers and the host read these).
RESOLUTION_ATTRIBUTES = ("pixelResolution", "resolution", "downsamplingFactors", "units", "offset")
PROVENANCE_ATTRIBUTE = "exllsmProvenance"  # the creation record (see provenance.py)


def check_container_path(container: str | Path) -> str:
    """A container path must be given: an empty one would silently mean the current directory.
    Returns it as a string; raises :class:`VolumeError`."""
    text = os.fspath(container) if isinstance(container, Path) else str(container)
    if not text.strip():
        raise VolumeError(f"container path {text!r} is empty: give the N5 or zarr directory, e.g. /data/brain.n5")
    return text


def normalise_dataset_path(dataset: str) -> str:
    """Strip leading and trailing slashes: ``/c1/s0/`` -> ``c1/s0``.

    A dataset lies inside its container: ``.`` and ``..`` segments (which would name the container
    itself or a place outside it) raise :class:`VolumeError`.
    """
    parts = [part for part in dataset.strip("/").split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise VolumeError(
            f"dataset path {dataset!r} has a '.' or '..' segment: a dataset is a path inside its container, e.g. /c1/s0"
        )
    return "/".join(parts)


def dataset_exists(container: str | Path, dataset: str) -> bool:
    """Whether a dataset (or anything else) exists at that path of the container."""
    return (Path(container) / normalise_dataset_path(dataset)).exists()


def same_dataset(container_a: str | Path, dataset_a: str, container_b: str | Path, dataset_b: str) -> bool:
    """Whether two (container, dataset) pairs name the same directory on disk (links resolved)."""
    a = Path(container_a).resolve() / normalise_dataset_path(dataset_a)
    b = Path(container_b).resolve() / normalise_dataset_path(dataset_b)
    return a.resolve() == b.resolve()


def is_n5(container: str | Path) -> bool:
    container = Path(container)
    if container.suffix.lower() == ".n5":
        return True
    attrs = container / "attributes.json"
    if attrs.is_file():
        try:
            return "n5" in json.loads(attrs.read_text() or "{}")
        except ValueError:
            return False
    return False


def _n5_store(container: str):
    import warnings

    import zarr

    with warnings.catch_warnings():  # zarr 2 warns that N5Store will not be in zarr 3; we pin zarr 2
        warnings.simplefilter("ignore", FutureWarning)
        return zarr.N5Store(container)


def _store(container: str | Path):
    import zarr

    container = str(container)
    if is_n5(container):
        return _n5_store(container)
    return zarr.DirectoryStore(container)


@dataclass
class Volume:
    """A 3-D dataset seen in x,y,z order."""

    container: str
    dataset: str
    array: object  # zarr.Array, axes z,y,x

    @property
    def shape(self) -> XYZ:
        return tuple(int(v) for v in reversed(self.array.shape))  # type: ignore[return-value]

    @property
    def chunks(self) -> XYZ:
        return tuple(int(v) for v in reversed(self.array.chunks))  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def path(self) -> Path:
        return Path(self.container) / self.dataset

    @property
    def box(self) -> Box:
        return Box((0, 0, 0), self.shape)

    def __str__(self) -> str:
        return f"{self.container}:/{self.dataset}"

    # ---- reading ---------------------------------------------------------------------------

    def read_zyx(self, box: Box) -> np.ndarray:
        """Read a box that lies inside the image, returned in storage order z,y,x.

        A chunk that cannot be read or decoded raises :class:`ChunkError` naming its file.
        """
        if not self.box.contains(box):
            raise VolumeError(f"box {box} lies outside {self} of shape {format_xyz(self.shape)}")
        (x0, y0, z0), (x1, y1, z1) = box.start, box.end
        with self._naming_bad_chunks(box):
            return self.array[z0:z1, y0:y1, x0:x1]

    def read_finite(self, box: Box) -> np.ndarray:
        """:meth:`read` (x,y,z), refusing NaN or infinite voxels of a float dataset with
        :class:`InputValueError` (how many in ``box`` and the first); integer data is not looked at."""
        data = self.read_zyx(box)
        if data.dtype.kind == "f":
            n, first = _count_non_finite(data)
            if n:
                raise self._non_finite_error(n, _shift(first, box.start), box)
        return data.transpose(2, 1, 0)

    def check_finite(self, box: Box, executor: Executor | None = None) -> None:
        """Raise :class:`InputValueError` if ``box`` (inside the image) of a float dataset holds NaN or
        infinite voxels, with how many and the first (lowest z, then y, then x) as x,y,z.  Reads the
        box chunk by chunk (in parallel with an executor); integer datasets return at once."""
        if self.dtype.kind != "f":
            return

        def count(piece: Box) -> tuple[int, tuple[int, int, int] | None]:
            n, first = _count_non_finite(self.read_zyx(piece))
            return n, None if first is None else _shift(first, piece.start)[::-1]  # z,y,x: compared as z, y, x

        pieces = split_by_chunks(box, self.chunks)
        counts = list(executor.map(count, pieces) if executor else map(count, pieces))
        n = sum(k for k, _ in counts)
        if n:
            raise self._non_finite_error(n, min(first for _, first in counts if first is not None)[::-1], box)

    def _non_finite_error(self, n: int, first: Sequence[int], box: Box) -> InputValueError:
        """The error for ``n`` non-finite voxels in ``box``, the first at x,y,z ``first``."""
        return InputValueError(
            f"{self} holds {n} NaN or infinite voxel{'s' if n != 1 else ''} in {box}, the first at x,y,z "
            f"{format_xyz(first)}: the model needs finite intensities; replace them in the input (e.g. with 0)"
        )

    def chunk_file(self, index: Sequence[int]) -> Path:
        """The file of the chunk with grid index x,y,z (N5: ``<dataset>/x/y/z``; zarr: its chunk key)."""
        from zarr.n5 import N5Store

        if isinstance(self.array.store, N5Store):
            return self.path.joinpath(*(str(int(i)) for i in index))
        return Path(self.container) / self.array._chunk_key(tuple(int(i) for i in reversed(index)))

    @contextmanager
    def _naming_bad_chunks(self, box: Box) -> Iterator[None]:
        """Around a read (or read-modify-write) of ``box``: a failure that a chunk of ``box`` causes
        becomes a :class:`ChunkError` naming that chunk's file; other failures pass unchanged."""
        try:
            yield
        except NeuronSegError:
            raise
        except Exception as exc:  # noqa: BLE001 - codecs raise anything (EOFError, struct.error, RuntimeError, ...)
            error = self._chunk_error(box)
            if error is None:
                raise
            raise error from exc

    def _chunk_error(self, box: Box) -> ChunkError | None:
        """After a failed read of ``box``: the first of its chunks that cannot be read, as a
        :class:`ChunkError` naming the file; None when every chunk reads (the failure was elsewhere)."""
        for piece in split_by_chunks(box, self.chunks):
            (x0, y0, z0), (x1, y1, z1) = piece.start, piece.end
            try:
                self.array.get_basic_selection((slice(z0, z1), slice(y0, y1), slice(x0, x1)))
            except Exception as exc:  # noqa: BLE001
                return ChunkError(self._chunk_message(piece, exc))
        return None

    def _chunk_message(self, piece: Box, exc: BaseException) -> str:
        path = self.chunk_file([s // c for s, c in zip(piece.start, self.chunks)])
        if isinstance(exc, OSError) and exc.strerror:
            return f"cannot read chunk file {path} of {self}: {exc.strerror}"
        what = f"{codecs.describe(self.array.compressor)} chunk of {self.dtype}"
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")
        return (
            f"chunk file {path} of {self} is truncated or corrupt: it does not decode as a {what} "
            f"({reason}); restore the file, or write the dataset again"
        )

    def read(self, box: Box) -> np.ndarray:
        """Read a box inside the image as an x,y,z array (a transposed view)."""
        return self.read_zyx(box).transpose(2, 1, 0)

    def read_reflect_zyx(self, box: Box, executor: Executor | None = None) -> np.ndarray:
        """Read any box in storage order; voxels outside the image are numpy-'reflect' padded.

        This is the original tool's border rule (numpy reflect padding of each tile) applied to the whole image: the edge
        voxel is not repeated, and the values do not depend on which box is asked for.
        """
        index = [reflect_index(np.arange(s, e), n) for s, e, n in zip(box.start, box.end, self.shape)]
        inner = Box(
            tuple(int(i.min()) for i in index),  # type: ignore[arg-type]
            tuple(int(i.max()) + 1 for i in index),  # type: ignore[arg-type]
        )
        if inner == box:
            return self.read_chunked_zyx(box, executor)
        if not box.contains(inner):  # reflections reach beyond the box: gather (rare, small boxes)
            data = self.read_chunked_zyx(inner, executor)
            ix, iy, iz = (i - o for i, o in zip(index, inner.start))
            return data[np.ix_(iz, iy, ix)]
        # Read straight into the padded array, then fill the pads axis by axis (as np.pad does).
        out = np.empty(box.shape[::-1], dtype=self.dtype)
        self.read_chunked_zyx(inner, executor, out=out[inner.slices(box.start)[::-1]])
        for axis_xyz, idx in enumerate(index):
            axis = 2 - axis_xyz
            local = idx - box.start[axis_xyz]
            pads = np.nonzero(local != np.arange(len(idx)))[0]
            if len(pads):
                source = np.take(out, local[pads], axis=axis)
                target = [slice(None)] * 3
                target[axis] = pads
                out[tuple(target)] = source
        return out

    def read_chunked_zyx(self, box: Box, executor: Executor | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Read a box inside the image (into ``out`` if given), decoding chunks in parallel with an executor."""
        if out is None:
            if executor is None:
                return self.read_zyx(box)
            out = np.empty(box.shape[::-1], dtype=self.dtype)
        pieces = list(split_by_chunks(box, self.chunks))

        def load(piece: Box) -> None:
            (x0, y0, z0), (x1, y1, z1) = piece.start, piece.end
            # decoded straight into the output (zarr copies the chunk's selection once)
            with self._naming_bad_chunks(piece):
                self.array.get_basic_selection(
                    (slice(z0, z1), slice(y0, y1), slice(x0, x1)), out=out[piece.slices(box.start)[::-1]]
                )

        if executor is None:
            for p in pieces:
                load(p)
        else:
            for f in [executor.submit(load, p) for p in pieces]:
                f.result()
        return out

    # ---- writing ---------------------------------------------------------------------------

    def write_zyx(self, start: XYZ, data_zyx: np.ndarray) -> None:
        """Write a z,y,x array whose first voxel lands at x,y,z ``start``."""
        (x0, y0, z0) = start
        z1, y1, x1 = z0 + data_zyx.shape[0], y0 + data_zyx.shape[1], x0 + data_zyx.shape[2]
        # a partly covered chunk is read back first: it may not decode
        with self._naming_bad_chunks(Box((x0, y0, z0), (x1, y1, z1))):
            try:
                self.array[z0:z1, y0:y1, x0:x1] = data_zyx
            except (OSError, KeyError) as exc:
                error = _os_error(exc)
                if error is None:
                    raise
                raise OutputError(write_error_message(f"chunks of {self}", error, self.path)) from exc

    def write_chunk(self, start: XYZ, data_zyx: np.ndarray) -> None:
        """Write one whole chunk (``start`` on the chunk grid, data = the chunk clipped to the image)
        from a buffer the caller gives up: in N5 its bytes are swapped to big-endian in place.

        N5 chunks are encoded here without zarr's copies (zarr makes a big-endian copy of the chunk
        and a second copy of the compressed stream with the block header), so a chunk in flight costs
        its buffer plus the compressed stream; the block is written to a temporary file and renamed,
        like zarr's own writes. The block header holds the clipped size, as Java N5 writes it. Other
        containers, and buffers of another dtype or layout, go through :meth:`write_zyx`.
        """
        chunks, shape = self.chunks, self.shape
        size = tuple(min(c, n - s) for s, c, n in zip(start, chunks, shape))
        if any(s % c for s, c in zip(start, chunks)) or data_zyx.shape != size[::-1]:
            raise ValueError(f"chunk at {format_xyz(start)} of shape {data_zyx.shape[::-1]} is not a chunk of {self}")
        if not is_n5(self.container) or data_zyx.dtype != self.dtype or not data_zyx.flags.c_contiguous:
            self.write_zyx(start, data_zyx)
            return
        import struct

        from numcodecs import get_codec

        config = self.array.compressor.compressor_config  # zarr's N5 wrapper: None for raw
        if data_zyx.dtype.byteorder == "<" or (data_zyx.dtype.byteorder == "=" and np.little_endian):
            data_zyx.byteswap(inplace=True)
            data_zyx = data_zyx.view(data_zyx.dtype.newbyteorder(">"))
        payload = get_codec(config).encode(data_zyx) if config else memoryview(data_zyx).cast("B")
        header = struct.pack(">HH3I", 0, 3, *size)
        index = [str(s // c) for s, c in zip(start, chunks)]
        path = self.path.joinpath(*index)  # N5 block path: x/y/z
        temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise OutputError(write_error_message(f"chunks of {self}", exc, self.path)) from exc

    def write_chunked_zyx(self, box: Box, data_zyx: np.ndarray, executor: Executor | None = None) -> None:
        """Write ``data_zyx`` (the whole of ``box``) chunk by chunk, in parallel if possible."""
        pieces = list(split_by_chunks(box, self.chunks))
        if executor is None:
            for piece in pieces:
                self.write_zyx(piece.start, data_zyx[piece.slices(box.start)[::-1]])
            return
        futures = [
            executor.submit(self.write_zyx, p.start, data_zyx[p.slices(box.start)[::-1]]) for p in pieces
        ]
        for f in futures:
            f.result()

    def remove_partial_chunk_files(self, box: Box, whole_chunks_only: bool = False) -> int:
        """Delete the temporary files of chunk writes that were killed (``<chunk file>.<32 hex>.partial``,
        as zarr's stores and :meth:`write_chunk` name them) of the chunks that meet ``box``, or only
        of the chunks that lie wholly in it (clipped to the image) with ``whole_chunks_only``.

        Call it only for chunks no other running job writes: a block's own chunks before the block
        writes them.  Each chunk directory is listed once.  Returns how many files were removed.
        """
        by_dir: dict[Path, set[str]] = {}
        for piece in split_by_chunks(box.intersect(self.box), self.chunks):
            index = [s // c for s, c in zip(piece.start, self.chunks)]
            if whole_chunks_only:
                whole = Box(
                    tuple(i * c for i, c in zip(index, self.chunks)),  # type: ignore[arg-type]
                    tuple(min((i + 1) * c, n) for i, c, n in zip(index, self.chunks, self.shape)),  # type: ignore[arg-type]
                )
                if piece != whole:
                    continue
            path = self.chunk_file(index)
            by_dir.setdefault(path.parent, set()).add(path.name)
        removed = 0
        for folder, names in by_dir.items():
            try:
                entries = os.listdir(folder)
            except OSError:  # no chunk written there yet
                continue
            for entry in entries:
                stem, _, suffix = entry.rpartition(".")
                chunk, _, token = stem.rpartition(".")
                if suffix == "partial" and chunk in names and len(token) == 32:
                    try:
                        os.unlink(folder / entry)
                        removed += 1
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        raise OutputError(write_error_message(f"chunks of {self}", exc, self.path)) from exc
        return removed


def _shift(first_zyx: Sequence[int], start: XYZ) -> XYZ:
    """A z,y,x index inside a box's array as x,y,z image coordinates."""
    return tuple(int(i) + s for i, s in zip(first_zyx[::-1], start))  # type: ignore[return-value]


def _count_non_finite(data: np.ndarray) -> tuple[int, tuple[int, int, int] | None]:
    """How many values of a z,y,x array are NaN or infinite, and the index of the first (C order)."""
    bad = ~np.isfinite(data)
    n = int(np.count_nonzero(bad))
    if not n:
        return 0, None
    return n, tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))  # type: ignore[return-value]


def split_by_chunks(box: Box, chunks: XYZ) -> list[Box]:
    """Cut ``box`` along the chunk grid (x fastest: storage order); an empty box is one empty piece."""
    return grid_cells(box, chunks) if not box.empty else [box]


def open_volume_spec(spec: str, what: str = "the volume") -> Volume:
    """Open a volume given as one string ``CONTAINER:DATASET`` (e.g. ``/data/mask.n5:/mask/s0``;
    split at the last colon)."""
    container, colon, dataset = spec.rpartition(":")
    if not colon or not container or not dataset.strip():
        raise VolumeError(f"{what} {spec!r} is not CONTAINER:DATASET (e.g. /data/mask.n5:/mask/s0)")
    return open_volume(container, dataset)


def _dataset_in_container_hint(path: Path) -> str:
    """When ``path`` is a dataset (or a group) inside a container, how to name it instead."""
    for parent in reversed(path.absolute().parents):  # the outermost container: groups carry the marker too
        if (parent / "attributes.json").is_file() and _json_object(parent / "attributes.json").get("n5") or (parent / ".zgroup").is_file():
            inner = path.absolute().relative_to(parent).as_posix()
            return f": {path} is the dataset /{inner} inside the container {parent}; give the container and the dataset path separately"
    return ""


def open_volume(container: str | Path, dataset: str, mode: str = "r") -> Volume:
    """Open ``container`` (N5 or zarr v2), then the dataset path inside it.

    Raises :class:`VolumeError` when the container or dataset is missing or not a 3-D array.
    """
    import zarr

    container = check_container_path(container)
    dataset = normalise_dataset_path(dataset)
    if not Path(container).is_dir():
        raise VolumeError(f"container {container} does not exist (expected an N5 or zarr directory)")
    try:
        root = zarr.open(store=_store(container), mode=mode)
    except (ValueError, KeyError, OSError) as exc:
        hint = _dataset_in_container_hint(Path(container))
        raise VolumeError(f"container {container} is not a readable N5 or zarr container ({exc}){hint}") from exc
    try:
        if dataset and not (Path(container) / dataset).is_dir():
            raise KeyError(dataset)
        node = root[dataset] if dataset else root
    except KeyError:
        available = _list_arrays(root)
        hint = f"; datasets present: {', '.join('/' + a for a in available)}" if available else ""
        raise VolumeError(f"dataset /{dataset} does not exist in {container}{hint}") from None
    except Exception as exc:  # noqa: BLE001 - metadata that does not parse (JSON, dims, dtype ...)
        meta = "attributes.json" if isinstance(root.store, zarr.N5Store) else ".zarray"
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        raise VolumeError(
            f"{container}:/{dataset} has unreadable metadata ({Path(container, dataset, meta)}: {reason}); "
            "a dataset needs valid N5 attributes (dimensions, blockSize, dataType, compression) or a zarr .zarray"
        ) from exc
    if not isinstance(node, zarr.Array):
        available = _list_arrays(node)
        hint = f"; arrays below it: {', '.join('/' + dataset + '/' + a for a in available)}" if available else ""
        raise VolumeError(f"{container}:/{dataset} is a group, not a dataset{hint}")
    if node.ndim != 3:
        raise VolumeError(
            f"{container}:/{dataset} has {node.ndim} dimensions {tuple(reversed(node.shape))}; a 3-D x,y,z volume is required"
        )
    return Volume(container, dataset, node)


def _list_arrays(group, limit: int = 8) -> list[str]:
    """Paths of the arrays below a group (for error hints)."""
    import zarr

    found: list[str] = []

    def visit(name: str, node) -> None:
        if isinstance(node, zarr.Array):
            found.append(name)

    try:
        group.visititems(visit)
    except Exception:  # noqa: BLE001 - a hint only
        return []
    return sorted(found)[:limit]


def create_volume(
    container: str | Path,
    dataset: str,
    shape: XYZ,
    chunks: XYZ,
    dtype: str | np.dtype,
    attributes: dict | None = None,
    compression_level: int | None = None,
    overwrite: bool = False,
    compression: str = "gzip",
) -> Volume:
    """Create a compressed 3-D dataset (x,y,z ``shape`` and ``chunks``).

    ``compression`` is an N5 compression name (:func:`codecs.compressor`: gzip, raw, bzip2, xz,
    blosc) and ``compression_level`` its level (None: the codec's default, gzip 1). An existing
    dataset is kept and reused if it has the same shape, chunks and dtype (with ``overwrite`` too:
    its finished blocks stay valid, and its own compression stays); another dataset raises
    :class:`OutputExistsError` unless ``overwrite`` is true, in which case it is replaced. A group,
    a link or a folder that is not a dataset is never replaced, and no dataset is created inside
    another. An output location that cannot be written raises :class:`OutputError` naming the path.

    Every dataset made here gets a new creation identity (:data:`IDENTITY_ATTRIBUTE`, see
    :func:`creation_identity`); a kept one keeps its identity, or gets one if it has none (made by
    an older version or another tool). A new dataset is made complete (attributes and identity)
    under a temporary sibling name and renamed into place, so the target path never holds a
    dataset whose creation did not finish. A replacement moves the old dataset away in one rename
    (its chunks and done markers go with it) only once the new one is complete, renames the new one
    in, then deletes the old: killed at any moment, it leaves the old dataset whole, no dataset, or
    the new one complete; what a killed run left beside the target is discarded by the next one.
    """
    import zarr

    dataset = normalise_dataset_path(dataset)
    if not dataset:
        raise OutputError("an output dataset path inside the container is required (e.g. /segmented/s0)")
    dtype = np.dtype(dtype)
    compressor = codecs.compressor(compression, compression_level)
    container = str(container)
    _check_creatable(container)
    target = Path(container) / dataset
    try:
        # A zarr container stays zarr; anything else (an N5 container, a new path, an empty folder)
        # is N5 unless it is named *.zarr.
        if _is_zarr(container) or (Path(container).suffix.lower() == ".zarr" and not is_n5(container)):
            store = zarr.DirectoryStore(container)
        else:
            store = _n5_store(container)
        check_not_inside_a_dataset(container, dataset)
        root = zarr.open_group(store=store, mode="a")
        discard_leftovers(target)  # temporaries and replaced datasets of killed runs
        replace = False
        if dataset in root:
            existing = root[dataset]
            same = (
                isinstance(existing, zarr.Array)
                and tuple(reversed(existing.shape)) == tuple(shape)
                and tuple(reversed(existing.chunks)) == tuple(chunks)
                and np.dtype(existing.dtype) == dtype
            )
            if same:  # kept even when replacing is allowed: its finished blocks stay valid
                if creation_identity(target) is None:
                    existing.attrs[IDENTITY_ATTRIBUTE] = new_identity()
                return Volume(container, dataset, existing)
            if not isinstance(existing, zarr.Array):
                raise OutputError(
                    f"{container}:/{dataset} is a group (it holds other datasets), not a dataset: "
                    "choose a dataset path such as /segmented/s0"
                )
            if not overwrite:
                raise OutputExistsError(
                    f"{container}:/{dataset} already exists with shape {format_xyz(reversed(existing.shape))}, "
                    f"chunks {format_xyz(reversed(existing.chunks))}, {existing.dtype}, not shape {format_xyz(shape)}, "
                    f"chunks {format_xyz(chunks)}, {dtype}; replace it explicitly or choose another dataset"
                )
            if target.is_symlink():
                raise OutputError(f"{container}:/{dataset} is a link to a dataset: it is never replaced; choose another dataset path")
            replace = True
        elif target.is_symlink() or (target.exists() and not (target.is_dir() and not any(target.iterdir()))):
            raise OutputError(
                f"{container}:/{dataset} exists and is not a dataset (a file, a link or a folder without dataset "
                "attributes): it is never replaced; remove it or choose another dataset path"
            )
        parent, _, leaf = dataset.rpartition("/")
        temporary = f"{parent}/.{leaf}.creating-{uuid.uuid4().hex[:12]}".lstrip("/")
        array = root.create_dataset(
            temporary,
            shape=tuple(reversed(shape)),
            chunks=tuple(reversed(chunks)),
            dtype=dtype,
            compressor=compressor,
            fill_value=0,
        )
        kept = {k: v for k, v in (attributes or {}).items() if k in (*RESOLUTION_ATTRIBUTES, PROVENANCE_ATTRIBUTE)}
        array.attrs.update({**kept, IDENTITY_ATTRIBUTE: new_identity()})
        _install(Path(container) / temporary, target, replace)
        array = root[dataset]
    except (OSError, KeyError) as exc:
        error = _os_error(exc)
        if error is None:
            raise
        top = target if target.exists() else Path(container)
        raise OutputError(write_error_message(f"{container}:/{dataset}", error, top)) from exc
    return Volume(container, dataset, array)


def _install(temporary: Path, target: Path, replace: bool) -> None:
    """Rename the complete new dataset ``temporary`` to ``target``; with ``replace``, the dataset at
    ``target`` is first renamed away in one step and deleted once the new one is in place."""
    try:
        testhook.checkpoint("create:temporary-complete")
        trash = _rename_away(target) if replace else None
        testhook.checkpoint("create:old-moved-away")
        try:
            os.rename(temporary, target)
        except OSError:
            if trash is not None:  # put the old dataset back rather than leave none
                os.rename(trash, target)
            raise
    except Exception:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    testhook.checkpoint("create:new-in-place")
    if trash is not None:
        shutil.rmtree(trash)


# The attribute that holds a dataset's creation identity: a random id that create_volume writes into
# every dataset it makes (and into a kept one that has none). Whatever vouches for a dataset's
# content (a block's done marker) records it, and trusts the content only while the dataset at the
# path still has it: a replaced or re-created dataset has another one.
IDENTITY_ATTRIBUTE = "exllsmCreationId"


def new_identity() -> str:
    return uuid.uuid4().hex


def _is_zarr_dataset(path: Path) -> bool:
    return (path / ".zarray").is_file()


def creation_identity(path: str | Path) -> str | None:
    """The creation identity of the dataset directory ``path``, read from disk now (never cached);
    None when no dataset is there or it has none."""
    path = Path(path)
    value = _json_object(path / (".zattrs" if _is_zarr_dataset(path) else "attributes.json")).get(IDENTITY_ATTRIBUTE)
    return value if isinstance(value, str) and value else None


def block_identity(path: str | Path) -> str | None:
    """What a block checks to know the output dataset at ``path`` is the one it started writing into,
    read from disk now: the creation identity, or, for a dataset another tool made (the host's own
    create_n5 when it keeps its processes), its :func:`_metadata_fingerprint`, which a replacement by
    any tool changes. None when no dataset is there."""
    identity = creation_identity(path)
    if identity is not None:
        return identity
    fingerprint = _metadata_fingerprint(Path(path))
    if fingerprint[1] is None:
        return None
    return "metadata-{}-{}".format(*fingerprint)


def dataset_identity(volume: Volume) -> dict:
    """What a dataset is, for records that must change when the same path names another dataset:
    its resolved container and dataset path, and its creation identity; for a dataset without one
    (another tool's, an older version's) its :func:`_metadata_fingerprint`."""
    record: dict = {"container": str(Path(volume.container).resolve()), "dataset": volume.dataset}
    identity = creation_identity(volume.path)
    if identity is not None:
        record["identity"] = identity
        return record
    digest, mtime_ns = _metadata_fingerprint(volume.path)
    record.update(attributes=digest, mtime_ns=mtime_ns)
    return record


def _metadata_fingerprint(path: Path) -> tuple[str, int | None]:
    """A dataset without a creation identity, told apart by its metadata file: a digest of its dims,
    chunks, dtype and compression, and the file's modification time (ns), which any rewrite of the
    metadata changes (None when there is no metadata file)."""
    zarr_format = _is_zarr_dataset(path)
    metadata = path / (".zarray" if zarr_format else "attributes.json")
    keys = ("shape", "chunks", "dtype", "compressor") if zarr_format else ("dimensions", "blockSize", "dataType", "compression")
    content = _json_object(metadata)
    digest = hashlib.sha256(json.dumps({k: content.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]
    try:
        mtime_ns = metadata.stat().st_mtime_ns
    except OSError:
        mtime_ns = None
    return digest, mtime_ns


def discard_dataset(path: Path) -> None:
    """Remove a dataset directory so that no moment leaves a dataset that looks complete: it is first
    renamed away in one step (its attributes, chunks and done markers go together), then deleted."""
    shutil.rmtree(_rename_away(path))


def _rename_away(path: Path) -> Path:
    """Rename a dataset directory to a hidden sibling that :func:`discard_leftovers` recognises."""
    trash = path.with_name(f".{path.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    return trash


def install_replacing(temporary: Path, output: Path) -> None:
    """Rename a complete ``temporary`` (folder or file) to ``output``: an existing output is first
    renamed away in one step (so it stays whole until the new one is there, and is put back if the
    rename in fails) and deleted afterwards."""
    trash = _rename_away(output) if output.exists() or output.is_symlink() else None
    try:
        os.rename(temporary, output)
    except OSError:
        if trash is not None:
            os.rename(trash, output)
        raise
    if trash is None:
        return
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def downsampling_factors(volume: Volume) -> XYZ:
    """A pyramid level's ``downsamplingFactors`` (x,y,z, relative to s0; [1,1,1] when absent);
    :class:`VolumeError` unless they are 3 positive integers."""
    value = input_attributes(volume).get("downsamplingFactors", [1, 1, 1])
    try:
        factors = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        factors = ()
    if len(factors) != 3 or min(factors) < 1:
        raise VolumeError(f"{volume} has downsamplingFactors {value!r}, not 3 positive integers x,y,z")
    return factors  # type: ignore[return-value]


def discard_leftovers(path: Path) -> None:
    """Delete what killed runs left beside the dataset ``path``: a replaced dataset whose deletion
    did not finish, a new dataset whose creation did not."""
    for pattern in (f".{path.name}.replaced-*", f".{path.name}.creating-*"):
        for leftover in path.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def check_not_inside_a_dataset(container: str, dataset: str) -> None:
    """A dataset cannot be created below another dataset (its chunks live there)."""
    parts = dataset.split("/")
    for i in range(1, len(parts)):
        above = Path(container, *parts[:i])
        if (above / ".zarray").is_file() or "dimensions" in _json_object(above / "attributes.json"):
            raise OutputError(
                f"{container}:/{dataset} would lie inside the dataset /{'/'.join(parts[:i])}: choose a path outside it"
            )


def _json_object(path: Path) -> dict:
    """A JSON object file's content; {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_zarr(container: str) -> bool:
    """An existing zarr v2 container (a group or array at its root)."""
    path = Path(container)
    return (path / ".zgroup").is_file() or (path / ".zarray").is_file()


def _check_creatable(container: str) -> None:
    """A container path must be a directory or creatable as one: no plain file at it or above it."""
    check_container_path(container)  # "" would be the current directory
    path = Path(container)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "exists and is a file, not" if p == path else f"lies under the file {p}, which is not"
                raise OutputError(f"cannot create {container}: it {what} a directory (an N5 or zarr container is a directory)")
            return


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind a failed store operation (zarr's DirectoryStore turns a failed mkdir into KeyError)."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def write_error_message(what: str, error: OSError, top: Path) -> str:
    """One line for a failed write: the path that refused it, who owns it and how to fix it.

    ``top`` is the directory to hand back to the user (the dataset or container).
    """
    import errno

    if error.filename is None:
        return f"cannot write {what}: {error.strerror or error}"
    name = os.fsdecode(error.filename)
    # shutil.rmtree reports bare entry names (it works relative to directory descriptors)
    failed = Path(name) if os.sep in name else top
    at = next((p for p in (failed, *failed.parents) if p.exists()), failed)
    if not top.exists():
        top = at
    if error.errno == errno.EROFS:
        return f"cannot write {what}: {at} is on a read-only file system; write the output somewhere writable"
    if error.errno not in (errno.EACCES, errno.EPERM):
        return f"cannot write {what}: {error.strerror} ({failed})"
    uid, gid = os.geteuid(), os.getegid()
    try:
        st = at.stat()
    except OSError:
        return f"cannot write {what}: {at} is not writable by this user (uid {uid})"
    mode = oct(st.st_mode & 0o777)
    if st.st_uid != uid:
        return (
            f"cannot write {what}: {at} is not writable by this user (uid {uid}); it belongs to uid {st.st_uid} "
            f"(mode {mode}). Output written by a container running as another user (e.g. root, docker run without -u) "
            f'causes this: run containers with -u "$(id -u):$(id -g)", or give the files back with '
            f"chown -R {uid}:{gid} {top}"
        )
    return f"cannot write {what}: {at} is not writable by this user (uid {uid}, mode {mode}); make it writable (chmod u+w {at})"


def input_attributes(volume: Volume) -> dict:
    """The resolution-like attributes of a dataset, to carry over to derived outputs."""
    try:
        attrs = dict(volume.array.attrs)
    except (ValueError, KeyError):
        return {}
    return {k: v for k, v in attrs.items() if k in RESOLUTION_ATTRIBUTES}


def default_io_threads() -> int:
    """One per CPU this process may use (:func:`.resources.cpus`), 2 to 8."""
    return max(2, min(8, cpus()))


def max_io_threads() -> int:
    """The most chunk I/O threads a run starts: 4 per CPU this process may use, 64 in all (more
    only cost memory and switching; each holds a chunk in flight)."""
    return max(2, min(64, 4 * cpus()))


def io_thread_count(requested: int | None, warn: Callable[[str], None] = log.warning) -> int:
    """The number of chunk I/O threads for a request: the default for None, at most :func:`max_io_threads`
    (with one line through ``warn`` when capped); :class:`ParameterError` below 1."""
    if requested is None:
        return default_io_threads()
    if requested < 1:
        raise ParameterError(f"{requested} I/O threads asked for: at least 1 is needed")
    cap = max_io_threads()
    if requested > cap:
        warn(f"{requested} I/O threads asked for: using {cap} (at most 4 per CPU core, 64 in all)")
        return cap
    return int(requested)


def io_executor(threads: int | None = None, background: bool = False) -> ThreadPoolExecutor:
    """A pool for chunk decoding/encoding.  Tasks in it must not wait on other tasks in it.

    With ``background`` its threads run at the lowest CPU priority (Linux ``nice`` 19 per thread):
    they then fill the cores whenever the model leaves one idle instead of slowing every
    multi-threaded model operation down to the pace of its slowest thread.
    """
    return ThreadPoolExecutor(
        max_workers=threads or default_io_threads(),
        thread_name_prefix="volume-io",
        initializer=lower_thread_priority if background else None,
    )


def lower_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux threads have their own nice value)."""
    tid = threading.get_native_id()
    try:  # SCHED_IDLE: runs only on a core nothing else wants, yields at once when one is needed
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or not permitted
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        except (AttributeError, OSError):
            pass


def check_output_volume(output: Volume, image_shape: XYZ, binary: bool) -> None:
    """The output must have the input's x,y,z dims and a dtype that can hold the result."""
    if output.shape != tuple(image_shape):
        raise OutputError(
            f"output dataset {output} has dims {format_xyz(output.shape)}, but the input has {format_xyz(image_shape)}; "
            "create it with create_volume.py from the input"
        )
    if not binary and output.dtype.kind not in "f":
        raise OutputError(
            f"output dataset {output} is {output.dtype}: probabilities in [0,1] need a float dataset "
            "(float32), or pass --as_binary_mask for a 0/1 mask"
        )
    if binary and output.dtype.kind not in "uif":
        raise OutputError(f"output dataset {output} is {output.dtype}; a binary mask needs uint8 (or any numeric type)")
    if not os.access(output.path, os.W_OK):
        raise OutputError(f"output dataset {output} is not writable (check permissions of {output.path})")
