"""Quick-look pictures: projections of a volume along z, y and x, with a result overlaid in colour.

One PNG shows the three orthogonal views of the raw data in grey (contrast from robust
percentiles), laid out as x,y (top left), z,y (top right, sharing y) and x,z (below, sharing x),
with a result of the same dims drawn over it:

- **probability** (a float dataset): a red-to-yellow colour map whose opacity is the probability;
- **mask** (uint8 holding only 0 and 1): one colour;
- **labels** (other integers, e.g. connected components): a stable colour per id
  (:func:`label_colours`: the same id has the same colour in every picture).

**Memory is bounded by a few chunks.** The volume is read one chunk at a time (one chunk per I/O
thread in flight; chunks, not slabs, because a reader decodes whole chunks anyway), each chunk is
reduced at once to its three projections on the picture's coarse grid, and only those 2-D grids
are kept. Every voxel is read exactly once, so the projections are exact: a neurite one voxel thin
shows however much the picture is reduced.

**Downsampling.** The picture's longest edge is ``max_size`` pixels (default 1024), margins
included; the panels keep the physical aspect of the voxels when the dataset has a
``pixelResolution`` (or ``resolution``) attribute, and their axes are in its unit (else in voxels).
Each axis is pooled by the whole factor ``f = ceil(voxels / panel pixels)``, so the pooled grid is
never finer than the panel (nothing is dropped when it is drawn):

- raw data, probabilities and masks: **max-pooling**. The maximum projection of a max-pooled
  volume is the max-pooled maximum projection, so each pixel is the brightest voxel of its whole
  column of the volume;
- labels: **never pooled by value** (ids are never averaged or mixed). Each pixel shows the label
  of the *first* foreground voxel along its ray, seen from the low-coordinate side (z = 0 for the
  x,y view, y = 0 for x,z, x = 0 for z,y), over all the rays the pixel covers; at equal depth the
  larger id wins. An object in front hides the one behind it, as in a rendering.
"""

from __future__ import annotations

import logging
import math
import os
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import OutputError, ParameterError, VolumeError
from .geometry import XYZ, Box, format_xyz
from .volume import Volume, default_io_threads, input_attributes, io_executor, write_error_message

log = logging.getLogger(__name__)

KINDS = ("auto", "probability", "mask", "labels")
DEFAULT_MAX_SIZE = 1024
MIN_MAX_SIZE = 256  # room for the axes' labels around the panels

# Layout, in pixels: margins around the three panels and the gap between them.
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM, GAP = 64, 16, 48, 44, 6
TITLE_LINES = 3  # of the text above the panels, wrapped to the picture's width
DPI = 100
BACKGROUND = "#111111"
FOREGROUND = "#d0d0d0"

# Decoded chunks in flight at once are capped to about this many bytes (fewer threads for big chunks).
IN_FLIGHT_BYTES = 1 << 30
NO_HIT = np.iinfo(np.int64).max  # depth of a ray that meets no foreground

PROBABILITY_OPACITY = 0.8  # opacity of p = 1 (the raw data still shows through)
MASK_COLOUR, MASK_OPACITY = (0.15, 0.95, 0.35), 0.55
LABEL_OPACITY = 0.7

ProgressCallback = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------------
# Geometry of the picture
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the three projections go in the picture and how much each axis is pooled.

    Panels, each an image of pooled pixels stretched over its on-screen box:
    ``xy`` (along z; rows y, columns x), ``zy`` (along x; rows y, columns z) and ``xz`` (along y;
    rows z, columns x).
    """

    shape: XYZ  # the volume, in voxels
    voxel: tuple[float, float, float]  # physical size of a voxel, x,y,z
    unit: str  # of ``voxel`` ('' when the dataset names none; 'voxels' when it gives no size)
    factors: XYZ  # pooling factor per axis
    panel: XYZ  # on-screen pixels per axis: x,y panel is panel[0] x panel[1], and so on
    size: tuple[int, int]  # picture width, height in pixels

    @property
    def grid(self) -> XYZ:
        """Pooled pixels per axis: ceil(voxels / factor)."""
        return tuple(-(-n // f) for n, f in zip(self.shape, self.factors))  # type: ignore[return-value]

    @property
    def extent(self) -> tuple[float, float, float]:
        """Physical size of the volume, x,y,z."""
        return tuple(n * r for n, r in zip(self.shape, self.voxel))  # type: ignore[return-value]

    def boxes(self) -> dict[str, tuple[int, int, int, int]]:
        """Each panel's box in the picture: (left, top, width, height) in pixels, top-left origin."""
        px, py, pz = self.panel
        right, below = MARGIN_LEFT + px + GAP, MARGIN_TOP + py + GAP
        return {
            "xy": (MARGIN_LEFT, MARGIN_TOP, px, py),
            "zy": (right, MARGIN_TOP, pz, py),
            "xz": (MARGIN_LEFT, below, px, pz),
        }

    def pixel_of(self, panel: str, a: float, b: float) -> tuple[int, int]:
        """The picture pixel (column, row) showing voxel coordinates (a, b) of a panel: x,y for
        ``xy``, z,y for ``zy``, x,z for ``xz``."""
        left, top, width, height = self.boxes()[panel]
        axes = {"xy": (0, 1), "zy": (2, 1), "xz": (0, 2)}[panel]
        column = left + int((a + 0.5) / self.shape[axes[0]] * width)
        row = top + int((b + 0.5) / self.shape[axes[1]] * height)
        return column, row


def plan_layout(shape: Sequence[int], voxel: Sequence[float] = (1.0, 1.0, 1.0), max_size: int = DEFAULT_MAX_SIZE,
                unit: str = "voxels") -> Layout:
    """The picture of a volume of ``shape`` voxels (x,y,z) of physical size ``voxel``: the longest
    picture edge is ``max_size`` pixels, the panels keep the physical aspect, and each axis is
    pooled by ``ceil(voxels / panel pixels)``.

    Raises :class:`ParameterError` when ``max_size`` leaves no room for the panels.
    """
    check_max_size(max_size)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise VolumeError(f"a picture needs a 3-D volume with at least one voxel per axis, not shape {shape}")
    ex, ey, ez = (n * float(r) for n, r in zip(shape, voxel))
    wide, high = max_size - MARGIN_LEFT - GAP - MARGIN_RIGHT, max_size - MARGIN_TOP - GAP - MARGIN_BOTTOM
    scale = min(wide / (ex + ez), high / (ey + ez))  # pixels per physical unit
    panel = tuple(max(1, round(e * scale)) for e in (ex, ey, ez))
    width = MARGIN_LEFT + panel[0] + GAP + panel[2] + MARGIN_RIGHT
    height = MARGIN_TOP + panel[1] + GAP + panel[2] + MARGIN_BOTTOM
    # rounding the panels may miss max_size by a pixel or two: the right or bottom margin takes it up
    if width >= height:
        width, height = max_size, min(height, max_size)
    else:
        width, height = min(width, max_size), max_size
    factors = tuple(max(1, -(-n // p)) for n, p in zip(shape, panel))
    return Layout(shape, tuple(float(r) for r in voxel), unit, factors, panel, (width, height))  # type: ignore[arg-type]


def check_max_size(max_size: int) -> int:
    """``max_size`` as an int; :class:`ParameterError` below :data:`MIN_MAX_SIZE`."""
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < MIN_MAX_SIZE:
        raise ParameterError(
            f"a picture of {max_size!r} pixels is too small: its longest edge must be at least {MIN_MAX_SIZE} pixels "
            f"(default {DEFAULT_MAX_SIZE})"
        )
    return int(max_size)


UNIT_NAMES = {"um": "µm", "micrometer": "µm", "micrometers": "µm", "micron": "µm", "microns": "µm", "μm": "µm"}


def voxel_size(volume: Volume) -> tuple[tuple[float, float, float], str]:
    """The physical voxel size x,y,z and its unit, from the dataset's ``pixelResolution`` (N5 viewer:
    ``{"dimensions": [x,y,z], "unit": "um"}`` or a list) or ``resolution`` ([x,y,z]) attribute, as
    :func:`volume.input_attributes` reads them. ``((1, 1, 1), "voxels")`` when it has neither (or
    they are not three positive numbers); the unit is '' when the attributes name none."""
    attrs = input_attributes(volume)
    size, unit = None, ""
    pixel = attrs.get("pixelResolution")
    if isinstance(pixel, dict):
        size, unit = pixel.get("dimensions"), pixel.get("unit") or ""
    elif isinstance(pixel, (list, tuple)):
        size = pixel
    if not _three_sizes(size):
        size = attrs.get("resolution")
    if not _three_sizes(size):
        return (1.0, 1.0, 1.0), "voxels"
    units = attrs.get("units")
    if not unit and isinstance(units, (list, tuple)) and units and isinstance(units[0], str):
        unit = units[0]
    unit = str(unit).strip()
    if unit.lower() in ("pixel", "pixels", "px", "voxel", "voxels"):
        unit = ""  # a size without a physical unit: the numbers are shown as they are
    return tuple(float(v) for v in size), UNIT_NAMES.get(unit.lower(), unit)  # type: ignore[union-attr,return-value]


def _three_sizes(value) -> bool:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return False
    try:
        return all(math.isfinite(float(v)) and float(v) > 0 for v in value)
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------
# Projections, read chunk by chunk
# ------------------------------------------------------------------------------------------------


@dataclass
class Projections:
    """The three projections of a volume on a layout's pooled grid, in display orientation:
    ``xy`` rows y, columns x (along z); ``zy`` rows y, columns z (along x); ``xz`` rows z,
    columns x (along y). ``mode`` 'max' holds maxima; 'first' holds labels (``depth``: the
    coordinate of the first foreground voxel along the ray, :data:`NO_HIT` where there is none)."""

    mode: str
    xy: np.ndarray
    zy: np.ndarray
    xz: np.ndarray
    depth: dict[str, np.ndarray] = field(default_factory=dict)

    def panels(self) -> dict[str, np.ndarray]:
        return {"xy": self.xy, "zy": self.zy, "xz": self.xz}


def chunk_boxes(volume: Volume) -> Iterator[Box]:
    """The volume's chunks, clipped to the image, in storage order (x fastest); generated lazily
    (a 10^11-voxel volume has ~10^5 of them)."""
    shape, chunks = volume.shape, volume.chunks
    counts = [-(-n // c) for n, c in zip(shape, chunks)]
    for iz in range(counts[2]):
        for iy in range(counts[1]):
            for ix in range(counts[0]):
                start = (ix * chunks[0], iy * chunks[1], iz * chunks[2])
                yield Box(start, tuple(min(s + c, n) for s, c, n in zip(start, chunks, shape)))  # type: ignore[arg-type]


def chunk_threads(volume: Volume, threads: int | None) -> int:
    """I/O threads for reading ``volume``: as asked (default: the volume module's), but no more
    than keep about :data:`IN_FLIGHT_BYTES` of chunks being read (and their copies) in flight: a
    512^3 float32 chunk (512 MB) is read by one thread."""
    threads = default_io_threads() if threads is None else max(1, int(threads))
    # a chunk being read costs about four copies of it: the file's bytes, the decoded block, its
    # native byte order, the read's result
    chunk_bytes = math.prod(volume.chunks) * max(volume.dtype.itemsize, 1)
    return max(1, min(threads, IN_FLIGHT_BYTES // max(1, 4 * chunk_bytes)))


def project(
    volume: Volume,
    layout: Layout,
    mode: str,
    threads: int | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> Projections:
    """The three projections of ``volume`` on ``layout``'s grid: ``mode`` 'max' (max-pooled
    maximum projections) or 'first' (labels: the first foreground voxel along each ray).

    Reads every chunk exactly once through :meth:`Volume.read_zyx`, at most one chunk per thread
    at a time; each is reduced to three small pooled planes in its thread, and the planes are
    merged here in the order the chunks were read (the result does not depend on it).
    """
    if mode not in ("max", "first"):
        raise ValueError(f"projection mode {mode!r}: 'max' or 'first'")
    dtype = np.dtype(np.uint8) if volume.dtype == np.bool_ else volume.dtype
    nx, ny, nz = layout.grid
    shapes = {"xy": (ny, nx), "xz": (nz, nx), "zy": (nz, ny)}  # zy is accumulated as rows z, transposed at the end
    if mode == "max":
        empty = np.nan if dtype.kind == "f" else np.iinfo(dtype).min
        values = {name: np.full(shape, empty, dtype=dtype) for name, shape in shapes.items()}
        depth: dict[str, np.ndarray] = {}
    else:
        values = {name: np.zeros(shape, dtype=dtype) for name, shape in shapes.items()}
        depth = {name: np.full(shape, NO_HIT, dtype=np.int64) for name, shape in shapes.items()}

    def work(box: Box) -> tuple[Box, dict]:
        data = volume.read_zyx(box)
        if data.dtype == np.bool_:
            data = data.view(np.uint8)
        return box, (_max_planes if mode == "max" else _first_planes)(data, box, layout.factors)

    def merge(item: tuple[Box, dict]) -> None:
        _box, planes = item
        for name, ((row, col), plane) in planes.items():
            if mode == "max":
                view = values[name][row : row + plane.shape[0], col : col + plane.shape[1]]
                np.fmax(view, plane, out=view)
                continue
            new_depth, new_label = plane
            at = (slice(row, row + new_depth.shape[0]), slice(col, col + new_depth.shape[1]))
            old_depth, old_label = depth[name][at], values[name][at]
            better = (new_depth < old_depth) | ((new_depth == old_depth) & (new_label > old_label))
            old_depth[better] = new_depth[better]
            old_label[better] = new_label[better]
        if on_chunk is not None:
            on_chunk()

    _each_chunk(volume, work, merge, chunk_threads(volume, threads))
    return Projections(
        mode,
        xy=values["xy"],
        zy=values["zy"].T.copy(),
        xz=values["xz"],
        depth={name: (d.T.copy() if name == "zy" else d) for name, d in depth.items()},
    )


def _each_chunk(volume: Volume, work: Callable, merge: Callable, threads: int) -> None:
    """``merge(work(box))`` for every chunk box, ``work`` in ``threads`` threads; at most two tasks
    per thread are queued at once (their results are small planes, but a 10^5-chunk volume's
    results must not pile up waiting)."""
    boxes = chunk_boxes(volume)
    if threads <= 1:
        for box in boxes:
            merge(work(box))
        return
    with io_executor(threads) as pool:
        pending: deque = deque()
        try:
            for box in boxes:
                pending.append(pool.submit(work, box))
                if len(pending) >= 2 * threads:
                    merge(pending.popleft().result())
            while pending:
                merge(pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()


def _bins(start: int, stop: int, factor: int) -> tuple[int, np.ndarray]:
    """For voxels [start, stop) of an axis pooled by ``factor``: the first pooled index they reach
    and, relative to ``start``, where each pooled pixel's voxels begin (``ufunc.reduceat`` indices)."""
    first = start // factor
    starts = np.arange(first, (stop - 1) // factor + 1, dtype=np.intp) * factor - start
    starts[0] = 0
    return first, starts


def _max_planes(data: np.ndarray, box: Box, factors: XYZ) -> dict:
    """A chunk (z,y,x) reduced to its three max-pooled maximum projections, with their grid origins."""
    (x0, y0, z0), (x1, y1, z1) = box.start, box.end
    bx, xs = _bins(x0, x1, factors[0])
    by, ys = _bins(y0, y1, factors[1])
    bz, zs = _bins(z0, z1, factors[2])

    def pool(plane: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return np.fmax.reduceat(np.fmax.reduceat(plane, rows, axis=0), cols, axis=1)

    return {
        "xy": ((by, bx), pool(np.fmax.reduce(data, axis=0), ys, xs)),
        "xz": ((bz, bx), pool(np.fmax.reduce(data, axis=1), zs, xs)),
        "zy": ((bz, by), pool(np.fmax.reduce(data, axis=2), zs, ys)),
    }


def _first_planes(data: np.ndarray, box: Box, factors: XYZ) -> dict:
    """A chunk (z,y,x) of labels reduced, per view, to the depth and label of the first foreground
    voxel of each pooled pixel (smallest depth over its rays; the larger label at equal depth)."""
    (x0, y0, z0), (x1, y1, z1) = box.start, box.end
    bx, xs = _bins(x0, x1, factors[0])
    by, ys = _bins(y0, y1, factors[1])
    bz, zs = _bins(z0, z1, factors[2])
    foreground = data != 0
    lowest = np.iinfo(data.dtype).min
    planes = {}
    for name, axis, origin, rows, cols, at in (
        ("xy", 0, z0, ys, xs, (by, bx)),
        ("xz", 1, y0, zs, xs, (bz, bx)),
        ("zy", 2, x0, zs, ys, (bz, by)),
    ):
        hit = foreground.any(axis=axis)
        index = foreground.argmax(axis=axis)
        label = np.take_along_axis(data, np.expand_dims(index, axis), axis=axis).squeeze(axis)
        depth = np.where(hit, index.astype(np.int64) + origin, NO_HIT)
        nearest = np.minimum.reduceat(np.minimum.reduceat(depth, rows, axis=0), cols, axis=1)
        spread = np.repeat(
            np.repeat(nearest, np.diff(np.append(rows, depth.shape[0])), axis=0),
            np.diff(np.append(cols, depth.shape[1])),
            axis=1,
        )
        candidates = np.where(depth == spread, label, lowest)
        chosen = np.maximum.reduceat(np.maximum.reduceat(candidates, rows, axis=0), cols, axis=1)
        planes[name] = (at, (nearest, chosen))
    return planes


# ------------------------------------------------------------------------------------------------
# Kinds of result and their colours
# ------------------------------------------------------------------------------------------------


def check_kind(kind: str, volume: Volume) -> str:
    """The projection mode a result needs for ``kind`` ('max' or 'first'); :class:`ParameterError`
    for an unknown kind or one the dtype cannot be (labels of a float dataset)."""
    if kind not in KINDS:
        raise ParameterError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    dtype = volume.dtype
    if dtype.kind not in "biuf":
        raise VolumeError(f"{volume} is {dtype}: a picture needs numbers (integers, floats or booleans)")
    if kind == "labels" and dtype.kind == "f":
        raise ParameterError(
            f"{volume} is {dtype}: labels need an integer dataset; draw it with kind probability or mask"
        )
    if kind in ("probability", "mask") or (kind == "auto" and dtype.kind == "f"):
        return "max"
    return "first"


def resolve_kind(kind: str, volume: Volume, projections: Projections) -> str:
    """The kind a result is drawn as: ``kind`` itself, or for 'auto' from the dtype: float =
    probability; bool, or 8-bit integers holding only 0 and 1 = mask; other integers = labels."""
    if kind != "auto":
        return kind
    dtype = volume.dtype
    if dtype.kind == "f":
        return "probability"
    if dtype == np.bool_:
        return "mask"
    if dtype.itemsize == 1:
        values = np.concatenate([p.ravel() for p in projections.panels().values()])
        if values.size == 0 or (values.min() >= 0 and values.max() <= 1):
            return "mask"
    return "labels"


def label_colours(ids: np.ndarray) -> np.ndarray:
    """A stable colour (RGB in [0, 1]) per label id: the same id has the same colour in every
    picture. Hues follow the golden ratio (consecutive ids, as connected components are numbered,
    differ by 0.38 of the colour circle); saturation and brightness vary a little with the id."""
    ids = np.asarray(ids)
    wrapped = (ids.astype(np.int64, copy=False) if ids.dtype.kind != "u" else ids.astype(np.uint64)) % (1 << 32)
    wrapped = wrapped.astype(np.float64)
    hue = (wrapped * 0.6180339887498949 + 0.11) % 1.0
    saturation = 0.75 + 0.25 * ((wrapped % 3) / 2)
    value = 1.0 - 0.15 * ((wrapped // 3) % 2)
    return _hsv_to_rgb(hue, saturation, value)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, i[None, ..., None], axis=0)[0]


def contrast_limits(raw: Projections, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Robust grey levels of the raw projections: their ``low`` and ``high`` percentiles (finite
    values only); ``high`` is above ``low`` even for a constant image."""
    values = np.concatenate([p.ravel() for p in raw.panels().values()]).astype(np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if hi <= lo:
        hi = lo + (abs(lo) * 1e-6 or 1.0)
    return lo, hi


def compose(raw: np.ndarray, limits: tuple[float, float], kind: str | None = None, result: np.ndarray | None = None,
            dtype: np.dtype | None = None) -> np.ndarray:
    """One panel as RGB in [0, 1] (rows, columns, 3): the raw projection in grey between
    ``limits``, with the result's projection of ``kind`` (of dataset dtype ``dtype``) over it."""
    lo, hi = limits
    grey = np.nan_to_num((raw.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo), nan=0.0)
    rgb = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
    if kind is None or result is None:
        return rgb
    if kind == "probability":
        p = result.astype(np.float32)
        if dtype is not None and dtype.kind in "iu":
            p = p / np.float32(np.iinfo(dtype).max)
        p = np.clip(np.nan_to_num(p, nan=0.0), 0, 1)
        colour = np.stack([np.ones_like(p), p, np.zeros_like(p)], axis=-1)  # 'autumn': red (low) to yellow (1)
        alpha = (PROBABILITY_OPACITY * p)[..., None]
    elif kind == "mask":
        on = result >= 0.5 if result.dtype.kind == "f" else result != 0
        colour = np.broadcast_to(np.array(MASK_COLOUR, dtype=np.float32), rgb.shape)
        alpha = (MASK_OPACITY * on)[..., None]
    elif kind == "labels":
        ids, inverse = np.unique(result, return_inverse=True)
        colour = label_colours(ids)[inverse.reshape(result.shape)]
        alpha = (LABEL_OPACITY * (result != 0))[..., None]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return (1 - alpha) * rgb + alpha * colour


# ------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------


@dataclass
class Picture:
    """A written quick-look picture."""

    path: Path
    layout: Layout
    result: str | None = None  # the overlaid dataset, 'container:/dataset'
    kind: str | None = None  # how it was drawn: probability, mask or labels
    labels: int = 0  # distinct label ids visible (labels only)

    @property
    def size(self) -> tuple[int, int]:
        return self.layout.size


def picture_name(volume: Volume) -> str:
    """A picture's file name after the dataset it shows: '<container name without extension>_<dataset
    path>.png' with anything but letters, digits, '.', '_' and '-' turned into '_' (the pipeline's
    volume ids are made the same way: seg.n5:/segmented/s0 -> seg_segmented_s0.png)."""
    text = f"{Path(volume.container.rstrip('/')).stem}/{volume.dataset}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") + ".png"


def picture_paths(raw: Volume, results: Sequence[Volume], output: str | Path) -> list[Path]:
    """Where the pictures go: ``output`` is a PNG file (one picture) or a folder (an existing one,
    or a path ending in '/'), where each picture is named after its result (:func:`picture_name`;
    after the input when there is no result). :class:`OutputError` otherwise."""
    text = os.fspath(output)
    if not text.strip():
        raise OutputError("the output path is empty: give a PNG file (e.g. look.png) or a folder")
    path = Path(text)
    count = max(1, len(results))
    if path.is_dir() or text.endswith(("/", os.sep)):
        names = [picture_name(v) for v in results] if results else [picture_name(raw)]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise OutputError(
                f"several results would be pictured as {', '.join(doubled)} in {path}: give them datasets or "
                "containers of different names, or make one picture at a time"
            )
        return [path / name for name in names]
    if path.exists() and not path.is_file():
        raise OutputError(f"the output {path} exists and is neither a folder nor a file")
    if path.suffix.lower() != ".png":
        raise OutputError(
            f"the output {path} is not a .png file name; for a folder, create it first or end the path with '/'"
        )
    if count > 1:
        raise OutputError(f"{count} results make {count} pictures: the output must be a folder, not the file {path}")
    return [path]


def write_quicklooks(
    raw: Volume,
    results: Sequence[Volume] = (),
    output: str | Path = ".",
    kind: str = "auto",
    max_size: int = DEFAULT_MAX_SIZE,
    threads: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[Picture]:
    """Quick-look pictures of ``raw``: one with each result overlaid (or one of ``raw`` alone).

    Args:
        raw: the input volume, drawn in grey.
        results: volumes of the same x,y,z dims to overlay, one picture each.
        output: a PNG file (one picture) or a folder (see :func:`picture_paths`).
        kind: how to draw the results: 'auto' (from the dtype), 'probability', 'mask' or 'labels'.
        max_size: the longest picture edge in pixels (at least :data:`MIN_MAX_SIZE`).
        threads: chunk I/O threads (capped by chunk size, :func:`chunk_threads`).
        on_progress: called with (chunks done, chunks in all) after each chunk.

    Returns:
        The pictures written, in the order of ``results``. Each PNG is written to a temporary
        name beside it and renamed, so a picture is complete or absent.

    Everything is checked before anything is read (the dims, the kinds, the output), so a bad
    argument leaves no picture. Raises :class:`ParameterError`, :class:`VolumeError` or
    :class:`OutputError`.
    """
    check_max_size(max_size)
    if kind not in KINDS:
        raise ParameterError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    check_kind("auto", raw)  # numbers
    modes = [check_kind(kind, r) for r in results]
    for result in results:
        if result.shape != raw.shape:
            raise VolumeError(
                f"the result {result} has dims {format_xyz(result.shape)}, but the input {raw} has "
                f"{format_xyz(raw.shape)}: a result is overlaid on the volume it was computed from"
            )
    paths = picture_paths(raw, results, output)
    voxel, unit = voxel_size(raw)
    layout = plan_layout(raw.shape, voxel, max_size, unit)
    for parent in {p.parent for p in paths}:
        parent.mkdir(parents=True, exist_ok=True)

    total = sum(_chunk_count(v) for v in (raw, *results))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    base = project(raw, layout, "max", threads, tick)
    limits = contrast_limits(base)
    if not results:
        panels = {name: compose(p, limits) for name, p in base.panels().items()}
        render(paths[0], layout, panels, [_describe_raw(raw, layout), "no result overlaid"])
        return [Picture(paths[0], layout)]
    pictures = []
    for result, mode, path in zip(results, modes, paths):
        projections = project(result, layout, mode, threads, tick)
        drawn = resolve_kind(kind, result, projections)
        panels = {
            name: compose(base.panels()[name], limits, drawn, overlay, result.dtype)
            for name, overlay in projections.panels().items()
        }
        labels = 0
        if drawn == "labels":
            ids = np.unique(np.concatenate([p.ravel() for p in projections.panels().values()]))
            labels = int(np.count_nonzero(ids))
        render(path, layout, panels, [_describe_raw(raw, layout), _describe_result(result, drawn, labels)])
        pictures.append(Picture(path, layout, str(result), drawn, labels))
    return pictures


def _chunk_count(volume: Volume) -> int:
    return math.prod(-(-n // c) for n, c in zip(volume.shape, volume.chunks))


def _name(volume: Volume) -> str:
    return f"{Path(volume.container.rstrip('/')).name}:/{volume.dataset}"


def _describe_raw(raw: Volume, layout: Layout) -> str:
    size = ""
    if layout.unit != "voxels":
        unit = f" {layout.unit}" if layout.unit else ""
        size = f", voxel {','.join(f'{v:g}' for v in layout.voxel)}{unit}"
    return (
        f"{_name(raw)}  x,y,z {format_xyz(raw.shape)}{size}  maximum projections, "
        f"1 pixel = {'x'.join(str(f) for f in layout.factors)} voxels"
    )


def _describe_result(result: Volume, kind: str, labels: int) -> str:
    how = {
        "probability": "probability, red (low) to yellow (1), opacity = p",
        "mask": "mask (green)",
        "labels": f"labels, one colour per id ({labels} shown; the first along each ray)",
    }[kind]
    return f"overlay {_name(result)} ({result.dtype}): {how}"


def render(path: str | Path, layout: Layout, panels: dict[str, np.ndarray], title: Sequence[str]) -> None:
    """Draw the three RGB panels with their axes and ``title`` lines, and write the PNG at ``path``
    (a temporary name beside it first, then renamed; nothing is left behind on failure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    width, height = layout.size
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor=BACKGROUND)
    FigureCanvasAgg(fig)
    ex, ey, ez = layout.extent
    covered = [g * f * r for g, f, r in zip(layout.grid, layout.factors, layout.voxel)]  # pooled pixels may overhang
    unit = f" ({layout.unit})" if layout.unit else ""
    spec = {  # panel: (horizontal axis, vertical axis, along, horizontal label shown, vertical label shown)
        "xy": (0, 1, "z", False, True),
        "zy": (2, 1, "x", True, False),
        "xz": (0, 2, "y", True, True),
    }
    for name, (left, top, w, h) in layout.boxes().items():
        across, down, along, show_across, show_down = spec[name]
        ax = fig.add_axes((left / width, 1 - (top + h) / height, w / width, h / height))
        ax.set_facecolor("black")
        ax.imshow(
            panels[name],
            interpolation="nearest",
            extent=(0, covered[across], covered[down], 0),
            aspect="auto",
        )
        ax.set_xlim(0, (ex, ey, ez)[across])
        ax.set_ylim((ex, ey, ez)[down], 0)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=max(2, w // 90)))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=max(2, h // 70)))
        ax.tick_params(colors=FOREGROUND, labelsize=7, length=3, labelbottom=show_across, labelleft=show_down)
        for spine in ax.spines.values():
            spine.set_color("#555555")
        if show_across:
            ax.set_xlabel(f"{'xyz'[across]}{unit}", color=FOREGROUND, fontsize=8, labelpad=2)
        if show_down:
            ax.set_ylabel(f"{'xyz'[down]}{unit}", color=FOREGROUND, fontsize=8, labelpad=2)
        if w >= 60 and h >= 16:
            ax.text(
                0.01, 0.99, f"along {along}", transform=ax.transAxes, ha="left", va="top", fontsize=7,
                color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.5, "linewidth": 0},
            )
    fig.text(6 / width, 1 - 4 / height, _wrap(title, width - 12), ha="left", va="top", fontsize=7, color=FOREGROUND,
             linespacing=1.35)
    _save(fig, Path(path))


def _wrap(lines: Sequence[str], pixels: int) -> str:
    """The title lines wrapped to ``pixels`` (about 5.5 pixels per character at 7 points), at most
    :data:`TITLE_LINES` lines, the last one cut with '...' when the text is longer."""
    import textwrap

    columns = max(20, int(pixels / 5.5))
    wrapped = [piece for line in lines for piece in textwrap.wrap(line, columns, break_on_hyphens=False) or [""]]
    if len(wrapped) > TITLE_LINES:
        wrapped = wrapped[: TITLE_LINES - 1] + [textwrap.shorten(" ".join(wrapped[TITLE_LINES - 1 :]), columns, placeholder=" ...")]
    return "\n".join(wrapped)


def _save(fig, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        fig.savefig(temporary, format="png", dpi=DPI, facecolor=fig.get_facecolor())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise OutputError(write_error_message(f"the picture {path}", exc, path.parent)) from exc
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
