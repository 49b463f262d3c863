"""Volume I/O for N5 and zarr v2 datasets, in x,y,z coordinates.

A dataset is named the way the host pipeline names it: a *container* path plus a *dataset* path
inside it (``-i /data/x.n5 -id /c1/s0``).  zarr exposes N5 arrays as z,y,x; this module
converts at its boundary so that every caller sees x,y,z.

Writes go chunk by chunk through a thread pool (gzip encoding releases the GIL), and zarr's
directory stores write each chunk to a temporary file and rename it, so a chunk on disk is either
the old one or the new one, never half of each.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import codecs
from .errors import OutputError, OutputExistsError, VolumeError
from .geometry import XYZ, Box, format_xyz, reflect_index

log = logging.getLogger(__name__)
codecs.install()  # ISA-L gzip/zlib: same streams, ~10x faster encoding

# Attributes carried from the input dataset to outputs (N5 viewers and the host read these).
RESOLUTION_ATTRIBUTES = ("pixelResolution", "resolution", "downsamplingFactors", "units", "offset")


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
        """Read a box that lies inside the image, returned in storage order z,y,x."""
        if not self.box.contains(box):
            raise VolumeError(f"box {box} lies outside {self} of shape {format_xyz(self.shape)}")
        (x0, y0, z0), (x1, y1, z1) = box.start, box.end
        return self.array[z0:z1, y0:y1, x0:x1]

    def read(self, box: Box) -> np.ndarray:
        """Read a box inside the image as an x,y,z array (a transposed view)."""
        return self.read_zyx(box).transpose(2, 1, 0)

    def read_reflect_zyx(self, box: Box, executor: Executor | None = None) -> np.ndarray:
        """Read any box in storage order; voxels outside the image are numpy-'reflect' padded.

        This is the original tool's border rule (spec 4.3) applied to the whole image: the edge
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
        import uuid

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


def split_by_chunks(box: Box, chunks: XYZ) -> list[Box]:
    """Cut ``box`` along the chunk grid (pieces in z,y,x storage order)."""
    edges = []
    for s, e, c in zip(box.start, box.end, chunks):
        cuts = [s] + list(range((s // c + 1) * c, e, c)) + [e]
        edges.append(list(itertools.pairwise(cuts)))
    return [
        Box((x0, y0, z0), (x1, y1, z1))
        for (z0, z1) in edges[2]
        for (y0, y1) in edges[1]
        for (x0, x1) in edges[0]
    ]


def open_volume(container: str | Path, dataset: str, mode: str = "r") -> Volume:
    """Open ``container`` (N5 or zarr v2), then the dataset path inside it.

    Raises :class:`VolumeError` when the container or dataset is missing or not a 3-D array.
    """
    import zarr

    container = str(container)
    dataset = normalise_dataset_path(dataset)
    if not Path(container).is_dir():
        raise VolumeError(f"container {container} does not exist (expected an N5 or zarr directory)")
    try:
        root = zarr.open(store=_store(container), mode=mode)
    except (ValueError, KeyError, OSError) as exc:
        raise VolumeError(f"container {container} is not a readable N5 or zarr container ({exc})") from exc
    try:
        if dataset and not (Path(container) / dataset).is_dir():
            raise KeyError(dataset)
        node = root[dataset] if dataset else root
    except KeyError:
        available = _list_arrays(root)
        hint = f"; datasets present: {', '.join('/' + a for a in available)}" if available else ""
        raise VolumeError(f"dataset /{dataset} does not exist in {container}{hint}") from None
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
    :class:`OutputExistsError` unless ``overwrite`` is true, in which case it is replaced (renamed
    away in one step, then deleted). A group is never replaced, and no dataset is created inside
    another. An output location that cannot be written raises :class:`OutputError` naming the path.
    """
    import zarr

    dataset = normalise_dataset_path(dataset)
    if not dataset:
        raise OutputError("an output dataset path inside the container is required (e.g. /segmented/s0)")
    dtype = np.dtype(dtype)
    compressor = codecs.compressor(compression, compression_level)
    container = str(container)
    _check_creatable(container)
    try:
        # A zarr container stays zarr; anything else (an N5 container, a new path, an empty folder)
        # is N5 unless it is named *.zarr.
        if _is_zarr(container) or (Path(container).suffix.lower() == ".zarr" and not is_n5(container)):
            store = zarr.DirectoryStore(container)
        else:
            store = _n5_store(container)
        check_not_inside_a_dataset(container, dataset)
        root = zarr.open_group(store=store, mode="a")
        if dataset in root:
            existing = root[dataset]
            same = (
                isinstance(existing, zarr.Array)
                and tuple(reversed(existing.shape)) == tuple(shape)
                and tuple(reversed(existing.chunks)) == tuple(chunks)
                and np.dtype(existing.dtype) == dtype
            )
            if same:  # kept even when replacing is allowed: its finished blocks stay valid
                return Volume(container, dataset, existing)
            if not isinstance(existing, zarr.Array):
                raise OutputError(
                    f"{container}:/{dataset} is a group (it holds other datasets), not a dataset: "
                    "choose a dataset path such as /segmented/s0"
                )
            if not overwrite:
                desc = (
                    f"shape {format_xyz(reversed(existing.shape))}, chunks {format_xyz(reversed(existing.chunks))}, {existing.dtype}"
                    if isinstance(existing, zarr.Array)
                    else "a group"
                )
                raise OutputExistsError(
                    f"{container}:/{dataset} already exists with {desc}, not shape {format_xyz(shape)}, "
                    f"chunks {format_xyz(chunks)}, {dtype}; replace it explicitly or choose another dataset"
                )
            discard_dataset(Path(container) / dataset)
        discard_leftovers(Path(container) / dataset)
        array = root.create_dataset(
            dataset,
            shape=tuple(reversed(shape)),
            chunks=tuple(reversed(chunks)),
            dtype=dtype,
            compressor=compressor,
            fill_value=0,
        )
        if attributes:
            array.attrs.update({k: v for k, v in attributes.items() if k in RESOLUTION_ATTRIBUTES})
    except (OSError, KeyError) as exc:
        error = _os_error(exc)
        if error is None:
            raise
        top = Path(container) / dataset if (Path(container) / dataset).exists() else Path(container)
        raise OutputError(write_error_message(f"{container}:/{dataset}", error, top)) from exc
    return Volume(container, dataset, array)


def discard_dataset(path: Path) -> None:
    """Remove a dataset directory so that no moment leaves a dataset that looks complete: it is first
    renamed away in one step (its attributes, chunks and done markers go together), then deleted."""
    trash = path.with_name(f".{path.name}.replaced-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def discard_leftovers(path: Path) -> None:
    """Delete what a replacement killed between its rename and its deletion left behind."""
    for leftover in path.parent.glob(f".{path.name}.replaced-*"):
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
    return max(2, min(8, os.cpu_count() or 2))


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
