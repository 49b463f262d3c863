"""Connected components over a volume cut into blocks, equal to labelling the whole volume at once.

Three steps, each per block except the merge, so memory per task is bounded by one block:

1. :func:`write_block_record` (one task per block): the block's foreground (``value > threshold``,
   or ``value != 0`` for a mask), optionally restricted to the objects an earlier pass kept, is
   labelled with 6- or 26-connectivity (``scipy.ndimage.label``).  What the merge needs is written
   to a *record* (``<records>/<block key>.npz``, atomically): per local object its voxel count, its
   first voxel (the smallest linear index in z,y,x storage order of the image), bounding box,
   coordinate sums, probability sum and maximum, whether it holds a seed voxel; and the block's six
   boundary planes of local labels.
2. :func:`merge_records` (one task): every record of the plan must be there and made with the
   same settings from the same input (else :class:`RecordError`, naming what is missing).
   Objects that touch across block faces (the high plane of a block against the low planes of the
   blocks after it, with the structure's in-plane offsets, so edges and corners are included) are
   joined (``scipy.sparse.csgraph.connected_components``); every object gets one id, consecutive
   from 1 in the order of its first voxel in storage scan order (x fastest, then y, then z): the
   order ``scipy.ndimage.label`` numbers a whole z,y,x array in.  Objects smaller than the minimum
   size (or without a seed voxel, for hysteresis) are dropped and the kept ones renumbered
   consecutively in the same order.  The *table* (``<records>/table.npz``) maps every block's
   local labels to final ids (0 = dropped); the object list is returned with the statistics.
   :func:`write_object_table` writes the object list as CSV and JSON.
3. :func:`block_labels` (one task per block): the block is labelled again (the same input and
   settings give the same local labels) and mapped through the table; :func:`write_blocks` writes
   blocks of it into a uint64 dataset, checked first (aligned to its chunks, in the plan), each
   block with a done marker as :mod:`.segment` keeps them.

So the labels equal ``scipy.ndimage.label`` of the whole thresholded volume, after the same size
filter and renumbering, for any grid of blocks (tested).  A killed task leaves no record or a
complete one (records, the table and the object table are written to a temporary name, then
renamed; a re-run removes what a killed one left), the merge refuses an incomplete set, and the
per-block steps recompute (a block written with a matching done marker is skipped): re-running
anything is safe.  The test hook (:mod:`.testhook`) can stop a process at
``record:temporary-written``, ``merge:table-temporary-written``,
``merge:objects-temporary-written`` and ``write:block-written``.

Global post-processing (:func:`post_process_block`) is two such passes: hysteresis (objects of
``p > low`` holding a voxel ``p > high``), then the size filter on ``p > probability threshold``
inside the kept objects (:func:`post_processing_tables` checks that the second pass was restricted
to the first); the result equals :func:`.postprocess.post_process` of one block covering the volume.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import testhook
from .errors import GeometryError, NeuronSegError, OutputError, ParameterError
from .geometry import Box, check_chunk_aligned, format_xyz
from .volume import Volume, block_identity, dataset_identity, input_attributes, same_dataset, write_error_message

RECORD_FORMAT = 1
TABLE_NAME = "table.npz"

HOST_SHAPES = {"diamond": 6, "box": 26}  # the host's connected_pixels_shape


class RecordError(NeuronSegError):
    """Block records that are missing, unreadable or made with other settings or input."""


def connectivity_of(value: int | str) -> int:
    """6 or 26 from ``6``, ``26``, ``"6"``, ``"26"`` or the host's ``"diamond"`` (6) / ``"box"`` (26)."""
    text = str(value).strip().lower()
    if text in HOST_SHAPES:
        return HOST_SHAPES[text]
    if text in ("6", "26"):
        return int(text)
    raise ParameterError(f"connectivity {value!r} is not 6 (diamond: faces) or 26 (box: faces, edges, corners)")


def structure(connectivity: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)


@dataclass(frozen=True)
class PassSettings:
    """What defines one labelling pass.

    ``threshold``: foreground is ``value > threshold``, or ``value >= threshold`` with ``inclusive``
    (the host's Spark connected components); None: ``value != 0`` (a mask).
    ``seed_threshold``: record whether each object holds a voxel ``> seed_threshold`` (hysteresis).
    ``restrict``: the records folder of an earlier pass: only voxels of objects that pass kept are
    foreground (the earlier pass's settings are read from its table).
    """

    threshold: float | None
    connectivity: int = 26
    seed_threshold: float | None = None
    restrict: str | None = None
    inclusive: bool = False

    def __post_init__(self) -> None:
        if self.threshold is None and self.inclusive:  # value != 0 either way: one identity
            object.__setattr__(self, "inclusive", False)
        connectivity_of(self.connectivity)
        for name, v in (("threshold", self.threshold), ("seed threshold", self.seed_threshold)):
            if v is not None and not (isinstance(v, (int, float)) and np.isfinite(v)):
                raise ParameterError(f"{name} {v!r} must be a finite number")

    def key(self) -> dict:
        key = asdict(self)
        if not self.inclusive:  # records written before the choice existed stay valid
            del key["inclusive"]
        if self.restrict is not None:  # the earlier pass by its table's content, not its path
            key["restrict"] = _read_table(Path(self.restrict))["fingerprint"]
        return key


# --------------------------------------------------------------------------------------------
# 1. Per block: labels and the record
# --------------------------------------------------------------------------------------------


def foreground_of(values: np.ndarray, settings: PassSettings) -> np.ndarray:
    """The pass's foreground: ``values`` above (or, inclusive, at least) the threshold, or nonzero."""
    if settings.threshold is None:
        return values != 0
    return values >= settings.threshold if settings.inclusive else values > settings.threshold


def block_key(block: Box) -> str:
    return f"{format_xyz(block.start).replace(',', '_')}-{format_xyz(block.end).replace(',', '_')}"


def local_labels(
    volume: Volume,
    block: Box,
    settings: PassSettings,
    executor=None,
    values: np.ndarray | None = None,
    restricted_to: np.ndarray | None = None,
) -> tuple[np.ndarray, int, np.ndarray]:
    """The block's local labels (z,y,x, int32, 1..n in the block's scan order), n, and the block's
    values (read here unless given: the block of ``volume``, z,y,x).  ``restricted_to``: the voxels
    the pass's ``restrict`` pass kept in this block, when the caller has them already."""
    from scipy import ndimage

    if values is None:
        values = volume.read_chunked_zyx(block, executor)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            volume.check_finite(block, executor)  # raises: how many, and the first
    foreground = foreground_of(values, settings)
    if settings.restrict is not None:
        if restricted_to is None:
            restricted_to = _labels_of(volume, block, checked_table(volume, settings.restrict), executor, values) > 0
        foreground &= restricted_to
    labels = np.empty(values.shape, dtype=np.int32)
    n = int(ndimage.label(foreground, structure=structure(settings.connectivity), output=labels))
    return labels, n, values


def block_record(volume: Volume, block: Box, settings: PassSettings, executor=None) -> dict:
    """What the merge needs of one block (see the module docstring)."""
    from scipy import ndimage

    labels, n, values = local_labels(volume, block, settings, executor)
    flat = labels.reshape(-1)
    nz = np.flatnonzero(flat)
    ids = flat[nz]
    # scipy numbers objects in scan order: an object's first voxel is where its id first appears
    rising = np.ones(len(ids), dtype=bool)
    if len(ids) > 1:
        rising[1:] = ids[1:] > np.maximum.accumulate(ids)[:-1]
    first_local = nz[rising]
    assert len(first_local) == n
    z, y, x = np.unravel_index(nz, labels.shape)
    X, Y, _ = volume.shape
    bz, by, bx = np.unravel_index(first_local, labels.shape)
    gx, gy, gz = bx + block.start[0], by + block.start[1], bz + block.start[2]
    first = (gz.astype(np.uint64) * Y + gy.astype(np.uint64)) * X + gx.astype(np.uint64)
    size = np.bincount(ids, minlength=n + 1)[1:].astype(np.int64)
    sums = np.stack([np.bincount(ids, weights=c.astype(np.float64) + s, minlength=n + 1)[1:]
                     for c, s in ((x, block.start[0]), (y, block.start[1]), (z, block.start[2]))])
    v = values.reshape(-1)[nz].astype(np.float64)
    value_sum = np.bincount(ids, weights=v, minlength=n + 1)[1:]
    value_max = np.full(n, -np.inf)
    if n:
        np.maximum.at(value_max, ids - 1, v)
    bbox = np.zeros((n, 6), dtype=np.int64)
    for i, sl in enumerate(ndimage.find_objects(labels, max_label=n)):
        (z0, z1), (y0, y1), (x0, x1) = ((s.start, s.stop) for s in sl)
        bbox[i] = (x0 + block.start[0], y0 + block.start[1], z0 + block.start[2],
                   x1 + block.start[0], y1 + block.start[1], z1 + block.start[2])
    seeded = np.zeros(n, dtype=bool)
    if settings.seed_threshold is not None and n:
        seeded = value_max > settings.seed_threshold
    faces = {
        "x_low": labels[:, :, 0], "x_high": labels[:, :, -1],  # (z, y)
        "y_low": labels[:, 0, :], "y_high": labels[:, -1, :],  # (z, x)
        "z_low": labels[0], "z_high": labels[-1],  # (y, x)
    }
    return {
        "n": n, "first": first, "size": size, "sums": sums, "value_sum": value_sum, "value_max": value_max,
        "bbox": bbox, "seeded": seeded, **{k: np.ascontiguousarray(f, dtype=np.uint32) for k, f in faces.items()},
    }


def records_identity(volume: Volume, settings: PassSettings) -> str:
    """The digest every record of one pass shares: settings, input identity and shape."""
    key = {"format": RECORD_FORMAT, "settings": settings.key(), "input": dataset_identity(volume), "shape": volume.shape}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def write_block_record(volume: Volume, block: Box, settings: PassSettings, records: str | Path, executor=None) -> int:
    """Label one block and write its record (atomically); returns its number of local objects."""
    record = block_record(volume, block, settings, executor)
    folder = Path(records)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"identity": records_identity(volume, settings), "block": [list(block.start), list(block.end)],
            "settings": asdict(settings)}
    _save_npz(folder / f"{block_key(block)}.npz", "record:temporary-written", meta=np.array(json.dumps(meta)), **record)
    return record["n"]


# --------------------------------------------------------------------------------------------
# 2. The merge
# --------------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    objects: int  # objects in the whole volume
    kept: int  # after the size (and seed) filter
    dropped_small: int
    dropped_unseeded: int
    pieces: int  # objects of all blocks before joining
    contacts: int  # distinct pairs of pieces touching across block faces
    table: Path
    rows: list[dict]  # per kept object, in id order: the object table
    columns: list[str] = field(default_factory=lambda: object_columns(False))  # the rows' keys, in order

    def summary(self) -> str:
        unseeded = f", {self.dropped_unseeded} without a seed voxel" if self.dropped_unseeded else ""
        return (
            f"{self.objects} objects ({self.pieces} pieces in blocks, {self.contacts} contacts across faces): "
            f"{self.kept} kept, {self.dropped_small} dropped as too small{unseeded}"
        )


def check_grid(blocks: Sequence[Box], image: Box) -> None:
    """The blocks must lie in ``image`` and tile a box of it as a grid (per axis the same cuts for
    all), as ``plan_blocks.py`` plans them; their sizes and starts are free."""
    if not blocks:
        raise GeometryError("no blocks given")
    for b in blocks:
        if not image.contains(b) or b.empty:
            raise GeometryError(f"block {b} is empty or not inside the image {image}")
    cuts = [sorted({b.start[a] for b in blocks} | {b.end[a] for b in blocks}) for a in range(3)]
    expected = 1
    for c in cuts:
        expected *= len(c) - 1
    starts = {b.start for b in blocks}
    if len(starts) != len(blocks) or len(blocks) != expected:
        raise GeometryError(
            f"the {len(blocks)} blocks do not form a grid (per axis the same cuts; {expected} cells expected): "
            "give the blocks of one plan (plan_blocks.py)"
        )
    for b in blocks:
        for a in range(3):
            i = cuts[a].index(b.start[a])
            if b.end[a] != cuts[a][i + 1]:
                raise GeometryError(f"block {b} does not end at the next cut along {'xyz'[a]} ({cuts[a][i + 1]})")


FACES = ("x_low", "x_high", "y_low", "y_high", "z_low", "z_high")


def load_records(records: str | Path, blocks: Sequence[Box], identity: str) -> list[dict]:
    """Every block's record, without its faces (read on demand: :func:`_face`); raises
    :class:`RecordError` naming the blocks whose record is missing or made otherwise."""
    folder = Path(records)
    missing, foreign, loaded = [], [], []
    for block in blocks:
        path = folder / f"{block_key(block)}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                record = {k: data[k] for k in data.files if k not in FACES}
            meta = json.loads(str(record.pop("meta")))
        except FileNotFoundError:
            missing.append(block)
            continue
        except Exception as exc:  # noqa: BLE001 - an unreadable record is as good as missing
            raise RecordError(f"the record of block {block} ({path}) is unreadable ({type(exc).__name__}): run that block again") from exc
        if meta.get("identity") != identity or meta.get("block") != [list(block.start), list(block.end)]:
            foreign.append(block)
            continue
        record["n"] = int(record["n"])
        record["path"] = path
        loaded.append(record)
    if missing or foreign:
        parts = []
        if missing:
            parts.append(f"{len(missing)} block(s) have no record (e.g. {', '.join(map(str, missing[:3]))})")
        if foreign:
            parts.append(f"{len(foreign)} record(s) were made with other settings or input (e.g. {', '.join(map(str, foreign[:3]))})")
        raise RecordError(f"cannot merge {folder}: {'; '.join(parts)}: run those blocks (again) first")
    return loaded


def _face(record: dict, name: str) -> np.ndarray:
    try:
        with np.load(record["path"], allow_pickle=False) as data:
            return data[name]
    except Exception as exc:  # noqa: BLE001
        raise RecordError(f"the record {record['path']} is unreadable ({type(exc).__name__}): run that block again") from exc


def _contacts(blocks: Sequence[Box], recs: list[dict], offsets: np.ndarray, connectivity: int) -> np.ndarray:
    """Pairs of global piece ids touching across block faces, shape (k, 2)."""
    by_low: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(blocks):
        for a in range(3):
            by_low.setdefault((a, b.start[a]), []).append(i)
    grow = 1 if connectivity == 26 else 0
    shifts = [(d1, d2) for d1 in (-1, 0, 1) for d2 in (-1, 0, 1)] if connectivity == 26 else [(0, 0)]
    # face arrays are (z, y) for x, (z, x) for y, (y, x) for z: the other two axes, slowest first
    others = {0: (2, 1), 1: (2, 0), 2: (1, 0)}
    names = {0: "x", 1: "y", 2: "z"}
    pairs = []
    for i, b in enumerate(blocks):
        for a in range(3):
            neighbours = by_low.get((a, b.end[a]), [])
            if not neighbours:
                continue
            p, q = others[a]  # face axis 0 is image axis p, face axis 1 is image axis q
            lo_p, hi_p = b.start[p] - grow, b.end[p] + grow
            lo_q, hi_q = b.start[q] - grow, b.end[q] + grow
            plane = np.zeros((hi_p - lo_p, hi_q - lo_q), dtype=np.int64)
            for j in neighbours:
                n_b = blocks[j]
                s_p, e_p = max(n_b.start[p], lo_p), min(n_b.end[p], hi_p)
                s_q, e_q = max(n_b.start[q], lo_q), min(n_b.end[q], hi_q)
                if s_p >= e_p or s_q >= e_q:
                    continue
                face = _face(recs[j], f"{names[a]}_low")[s_p - n_b.start[p] : e_p - n_b.start[p], s_q - n_b.start[q] : e_q - n_b.start[q]]
                face = face.astype(np.int64)
                plane[s_p - lo_p : e_p - lo_p, s_q - lo_q : e_q - lo_q] = np.where(face > 0, face + offsets[j], 0)
            own = _face(recs[i], f"{names[a]}_high").astype(np.int64)
            own = np.where(own > 0, own + offsets[i], 0)
            h, w = own.shape
            for d1, d2 in shifts:
                other = plane[grow + d1 : grow + d1 + h, grow + d2 : grow + d2 + w]
                both = (own > 0) & (other > 0)
                if both.any():
                    pairs.append(np.unique(np.stack([own[both], other[both]], axis=1), axis=0))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def records_settings(records: str | Path, blocks: Sequence[Box]) -> PassSettings:
    """The pass settings the records in ``records`` were made with (read from the first block's
    record; :func:`merge_records` then checks that every record agrees)."""
    folder = Path(records)
    for block in blocks:
        path = folder / f"{block_key(block)}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    return PassSettings(**json.loads(str(data["meta"]))["settings"])
            except Exception as exc:  # noqa: BLE001
                raise RecordError(f"the record of block {block} ({path}) is unreadable ({type(exc).__name__}): run that block again") from exc
    raise RecordError(f"no block of the plan has a record in {folder}: run the per-block labelling first")


def merge_records(
    volume: Volume,
    blocks: Sequence[Box],
    records: str | Path,
    min_size: int = 0,
    require_seed: bool = False,
    settings: PassSettings | None = None,
) -> MergeResult:
    """Join the blocks' objects into the volume's objects and write the table (see the module docstring).

    ``min_size``: objects with fewer voxels are dropped (id 0); ``require_seed``: objects without a
    voxel above the pass's seed threshold are dropped too (hysteresis).  ``settings``: the pass the
    records must have been made with (default: what the records say; all must agree).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    blocks = list(blocks)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ParameterError(f"minimum object size {min_size!r} must be a whole number of voxels >= 0")
    check_grid(blocks, volume.box)
    if settings is None:
        settings = records_settings(records, blocks)
    if require_seed and settings.seed_threshold is None:
        raise ParameterError("objects can only be required to hold a seed voxel when the pass has a seed threshold")
    identity = records_identity(volume, settings)
    recs = load_records(records, blocks, identity)
    counts = np.array([r["n"] for r in recs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    total = int(counts.sum())
    pairs = _contacts(blocks, recs, offsets, settings.connectivity)
    # node k (0-based) is global piece k + 1
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0] - 1, pairs[:, 1] - 1)), shape=(total, total))
    n_objects, root = connected_components(graph, directed=False) if total else (0, np.zeros(0, dtype=np.int64))

    def cat(name: str, axis: int = 0) -> np.ndarray:
        return np.concatenate([r[name] for r in recs], axis=axis)

    size = np.bincount(root, weights=cat("size"), minlength=n_objects).astype(np.int64)
    first = np.full(n_objects, np.iinfo(np.uint64).max, dtype=np.uint64)
    np.minimum.at(first, root, cat("first").astype(np.uint64))
    sums = np.stack([np.bincount(root, weights=w, minlength=n_objects) for w in cat("sums", 1)])
    value_sum = np.bincount(root, weights=cat("value_sum"), minlength=n_objects)
    value_max = np.full(n_objects, -np.inf)
    np.maximum.at(value_max, root, cat("value_max"))
    bbox_lo = np.full((n_objects, 3), np.iinfo(np.int64).max, dtype=np.int64)
    bbox_hi = np.full((n_objects, 3), np.iinfo(np.int64).min, dtype=np.int64)
    bb = cat("bbox")
    for k in range(3):
        np.minimum.at(bbox_lo[:, k], root, bb[:, k])
        np.maximum.at(bbox_hi[:, k], root, bb[:, 3 + k])
    seeded = np.zeros(n_objects, dtype=bool)
    np.logical_or.at(seeded, root, cat("seeded").astype(bool))

    order = np.argsort(first, kind="stable")  # canonical: first voxel in storage scan order
    keep = size >= min_size
    if require_seed:
        keep &= seeded
    kept_in_order = order[keep[order]]
    final = np.zeros(n_objects, dtype=np.uint64)
    final[kept_in_order] = np.arange(1, len(kept_in_order) + 1, dtype=np.uint64)
    mapping = np.concatenate([[0], final[root]]).astype(np.uint64)  # global piece id -> final id
    table = Path(records) / TABLE_NAME
    fingerprint = hashlib.sha256(identity.encode() + mapping.tobytes() + str(min_size).encode() + str(require_seed).encode()).hexdigest()[:24]
    meta = {"identity": identity, "settings": asdict(settings), "fingerprint": fingerprint, "min_size": int(min_size),
            "require_seed": bool(require_seed), "blocks": [[list(b.start), list(b.end)] for b in blocks]}
    _save_npz(table, "merge:table-temporary-written", meta=np.array(json.dumps(meta)), mapping=mapping, offsets=offsets, counts=counts)

    rows = []
    resolution, unit = physical_scale(volume)
    for obj in kept_in_order:
        n = int(size[obj])
        centroid = sums[:, obj] / n
        lo, hi = bbox_lo[obj], bbox_hi[obj]
        row = {
            "id": int(final[obj]), "voxels": n,
            "x0": int(lo[0]), "y0": int(lo[1]), "z0": int(lo[2]), "x1": int(hi[0]), "y1": int(hi[1]), "z1": int(hi[2]),
            "centroid_x": float(centroid[0]), "centroid_y": float(centroid[1]), "centroid_z": float(centroid[2]),
        }
        if resolution is not None:
            row.update({f"{a}{e}_{unit}": float(v * r) for e, box in ((0, lo), (1, hi)) for a, v, r in zip("xyz", box, resolution)})
            row.update({f"centroid_{a}_{unit}": float(c * r) for a, c, r in zip("xyz", centroid, resolution)})
            row[f"volume_{unit}3"] = float(n * np.prod(resolution))
        row["mean_value"] = float(value_sum[obj] / n)
        row["max_value"] = float(value_max[obj])
        rows.append(row)
    unseeded = int((~seeded).sum()) if require_seed else 0
    small = int((size < min_size).sum()) if not require_seed else int(((size < min_size) & seeded).sum())
    return MergeResult(
        n_objects, len(kept_in_order), small, unseeded, total, len(pairs), table, rows, object_columns(resolution is not None, unit)
    )


def object_columns(physical: bool, unit: str = "um") -> list[str]:
    """The object table's columns, in order: id, voxel count, bounding box (x0,y0,z0 inclusive,
    x1,y1,z1 exclusive) and centroid in voxels, then (with a resolution) the box, centroid and volume
    in ``unit``, then the mean and max value (probability) over the object's voxels."""
    columns = ["id", "voxels", "x0", "y0", "z0", "x1", "y1", "z1", "centroid_x", "centroid_y", "centroid_z"]
    if physical:
        columns += [f"{a}{e}_{unit}" for e in (0, 1) for a in "xyz"]
        columns += [f"centroid_{a}_{unit}" for a in "xyz"] + [f"volume_{unit}3"]
    return columns + ["mean_value", "max_value"]


def object_table_paths(path: str | Path) -> tuple[Path, Path]:
    """The CSV and JSON files of an object table written to ``path`` (the JSON: same stem, ``.json``);
    :class:`OutputError` unless ``path`` can name the CSV file."""
    csv_path = Path(path)
    if csv_path.suffix.lower() == ".json" or not csv_path.name or csv_path.is_dir():
        raise OutputError(f"object table path {str(path)!r} must name a CSV file (e.g. objects.csv); the JSON goes beside it")
    return csv_path, csv_path.with_suffix(".json")


def write_object_table(result: MergeResult, path: str | Path, about: dict | None = None) -> tuple[Path, Path]:
    """Write the merge's object table as CSV at ``path`` and as JSON beside it (same stem, ``.json``),
    each whole or not at all.  The JSON holds the counts under ``summary``, ``about`` (e.g. the input
    and the settings), the columns, and the rows under ``objects``.  Returns both paths."""
    csv_path, json_path = object_table_paths(path)

    def write_csv(tmp: Path) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=result.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(result.rows)
        tmp.write_text(text.getvalue())

    def write_json(tmp: Path) -> None:
        counts = {k: getattr(result, k) for k in ("objects", "kept", "dropped_small", "dropped_unseeded", "pieces", "contacts")}
        content = {"summary": counts, **(about or {}), "columns": result.columns, "objects": result.rows}
        tmp.write_text(json.dumps(content, indent=1) + "\n")

    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically({csv_path: write_csv, json_path: write_json}, "merge:objects-temporary-written")
    except OSError as exc:
        raise OutputError(write_error_message("the object table", exc, csv_path.parent)) from exc
    return csv_path, json_path


def physical_scale(volume: Volume) -> tuple[tuple[float, float, float] | None, str]:
    """The voxel size x,y,z and unit from ``pixelResolution`` (or ``resolution``), if the dataset has one."""
    attrs = input_attributes(volume)
    pr = attrs.get("pixelResolution")
    if isinstance(pr, dict) and isinstance(pr.get("dimensions"), list) and len(pr["dimensions"]) == 3:
        try:
            return tuple(float(v) for v in pr["dimensions"]), str(pr.get("unit") or "um")  # type: ignore[return-value]
        except (TypeError, ValueError):
            pass
    res = attrs.get("resolution")
    if isinstance(res, list) and len(res) == 3:
        try:
            return tuple(float(v) for v in res), "um"  # type: ignore[return-value]
        except (TypeError, ValueError):
            pass
    return None, ""


# --------------------------------------------------------------------------------------------
# 3. Per block: final labels
# --------------------------------------------------------------------------------------------


def _read_table(path: Path) -> dict:
    """A merge table (``path`` is the table file or its records folder)."""
    if path.is_dir():
        path = path / TABLE_NAME
    try:
        with np.load(path, allow_pickle=False) as data:
            table = {k: data[k] for k in data.files}
        meta = json.loads(str(table.pop("meta")))
    except FileNotFoundError:
        raise RecordError(f"no merge table at {path}: run the merge first") from None
    except Exception as exc:  # noqa: BLE001
        raise RecordError(f"the merge table {path} is unreadable ({type(exc).__name__}): run the merge again") from exc
    table.update(meta)
    table["blocks"] = [Box(tuple(s), tuple(e)) for s, e in meta["blocks"]]  # type: ignore[arg-type]
    return table


def table_mapping(table: dict, block: Box) -> np.ndarray:
    """Local label (0..n) -> final id (0 = background or dropped) of one block of the table's plan."""
    try:
        i = table["blocks"].index(block)
    except ValueError:
        raise GeometryError(f"block {block} is not one of the {len(table['blocks'])} blocks the merge table was made for") from None
    start, n = int(table["offsets"][i]), int(table["counts"][i])
    out = np.zeros(n + 1, dtype=np.uint64)
    out[1:] = table["mapping"][start + 1 : start + 1 + n]
    return out


def checked_table(volume: Volume, records: str | Path) -> dict:
    """The merge table in ``records``, refused (:class:`RecordError`) unless it was made from this
    input with the settings it records (an earlier pass it was restricted to included)."""
    table = _read_table(Path(records))
    try:
        settings = PassSettings(**table["settings"])
        same = records_identity(volume, settings) == table["identity"]
    except RecordError as exc:  # the earlier pass's table is gone or unreadable
        raise RecordError(f"the merge table in {records} depends on a pass that cannot be read: {exc}") from exc
    if not same:
        raise RecordError(
            f"the merge table in {records} was made from another input or with other settings (or the pass it was "
            f"restricted to changed since): run the labelling and the merge again for {volume}"
        )
    return table


def block_labels(volume: Volume, block: Box, records: str | Path, executor=None) -> np.ndarray:
    """Final uint64 labels of one block (z,y,x), from its local labels and the merge table."""
    return _labels_of(volume, block, checked_table(volume, records), executor)


def _labels_of(volume: Volume, block: Box, table: dict, executor=None, values: np.ndarray | None = None) -> np.ndarray:
    labels, _, _ = local_labels(volume, block, PassSettings(**table["settings"]), executor, values)
    return table_mapping(table, block)[labels]


def post_process_block(volume: Volume, block: Box, hysteresis_records: str | Path, size_records: str | Path, executor=None) -> np.ndarray:
    """Globally post-processed probabilities of one block (z,y,x float32; uint8 for a 0/1 mask):
    voxels of objects the hysteresis pass kept, minus the objects the size pass dropped."""
    hysteresis, size = post_processing_tables(volume, hysteresis_records, size_records)
    return _post_processed(volume, block, hysteresis, size, executor)


def post_processing_tables(volume: Volume, hysteresis_records: str | Path, size_records: str | Path) -> tuple[dict, dict]:
    """The two merge tables of global post-processing, checked: both from this input, and the size
    pass restricted to the objects the hysteresis pass kept."""
    hysteresis = checked_table(volume, hysteresis_records)
    size = checked_table(volume, size_records)
    if PassSettings(**size["settings"]).key()["restrict"] != hysteresis["fingerprint"]:
        raise RecordError(
            f"the size pass in {size_records} was not restricted to the hysteresis pass in {hysteresis_records}: "
            f"label its blocks restricted to that pass, then merge them again"
        )
    return hysteresis, size


def _post_processed(volume: Volume, block: Box, hysteresis: dict, size: dict, executor=None) -> np.ndarray:
    values = volume.read_chunked_zyx(block, executor)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        volume.check_finite(block, executor)  # raises: how many, and the first
    kept = _labels_of(volume, block, hysteresis, executor, values) > 0
    # the size pass is restricted to the hysteresis pass (post_processing_tables checked it)
    labels, _, _ = local_labels(volume, block, PassSettings(**size["settings"]), executor, values, kept)
    small = (labels > 0) & (table_mapping(size, block)[labels] == 0)
    del labels
    out = values.astype(post_processed_dtype(volume))  # a copy for float32 input too: values stays the input
    out[~kept | small] = 0
    return out


# --------------------------------------------------------------------------------------------
# 4. Per block: the result written into an output dataset
# --------------------------------------------------------------------------------------------


@dataclass
class WriteResult:
    block: Box
    post_processing: bool  # globally post-processed probabilities, not labels
    objects: int = 0  # distinct object ids in the block (labels)
    voxels: int = 0  # nonzero voxels written
    seconds: float = 0.0
    skipped: bool = False

    def summary(self) -> str:
        if self.skipped:
            return f"block {self.block}: already done (marker present), skipped"
        if self.post_processing:
            return f"block {self.block}: {self.voxels} voxels kept by post-processing, written in {self.seconds:.1f} s"
        return f"block {self.block}: {self.objects} objects ({self.voxels} voxels) labelled in {self.seconds:.1f} s"


def post_processed_dtype(volume: Volume) -> np.dtype:
    """What global post-processing writes for ``volume``: uint8 for a uint8 input (a 0/1 mask, the
    binary segmentation: hysteresis keeps every object there, so the size filter decides; other
    values are kept as they are), else float32 probabilities."""
    return np.dtype(np.uint8) if volume.dtype == np.uint8 else np.dtype(np.float32)


def check_result_output(output: Volume, volume: Volume, post_processing: bool) -> None:
    """The output must be another dataset than the input, of its dims, uint64 for labels (for
    post-processing :func:`post_processed_dtype`: float32 probabilities, uint8 for a 0/1 mask), and
    writable."""
    if same_dataset(volume.container, volume.dataset, output.container, output.dataset):
        raise OutputError(f"the output {output} is the input dataset itself: write into another dataset")
    if output.shape != volume.shape:
        raise OutputError(
            f"output dataset {output} has dims {format_xyz(output.shape)}, but the input has {format_xyz(volume.shape)}: "
            "create it from the input (create_volume.py)"
        )
    wanted = post_processed_dtype(volume) if post_processing else np.dtype(np.uint64)
    if output.dtype != wanted:
        what = ("post-processed masks" if wanted == np.uint8 else "post-processed probabilities") if post_processing else "labels"
        raise OutputError(f"output dataset {output} is {output.dtype}: {what} are written into a {wanted} dataset")
    if not os.access(output.path, os.W_OK):
        raise OutputError(f"output dataset {output} is not writable (check permissions of {output.path})")


def write_blocks(
    volume: Volume,
    output: Volume,
    blocks: Sequence[Box],
    records: str | Path | None = None,
    post_processing: tuple[str | Path, str | Path] | None = None,
    executor: Executor | None = None,
    skip_done: bool = True,
    on_result: Callable[[WriteResult], None] | None = None,
) -> list[WriteResult]:
    """Write the final labels of ``blocks`` (from the merge table in ``records``) into the uint64
    ``output``, or with ``post_processing`` = (hysteresis records, size records) the globally
    post-processed probabilities into the float32 ``output`` (a uint8 0/1 mask into a uint8 one).

    Everything is checked before the first block is written: the tables (made from this input, the
    size pass restricted to the hysteresis pass), the output (:func:`check_result_output`), every
    block one of the tables' plan, given once and aligned to the output's chunk grid (or the plan's
    edges), so blocks written by parallel jobs never share a chunk.  Each block is recomputed from
    the input and written whole; a done marker (as :mod:`.segment` keeps them, recording the tables'
    fingerprints and the output's identity) lets a re-run skip it unless ``skip_done`` is false.
    """
    from .segment import block_is_done, check_output_identity, invalidate_overlapping_markers, mark_block_done, run_fingerprint

    if (records is None) == (post_processing is None):
        raise ParameterError("give either the records of one pass (labels) or the hysteresis and size records (post-processing)")
    if post_processing is not None:
        tables = list(post_processing_tables(volume, *post_processing))
    else:
        tables = [checked_table(volume, records)]  # type: ignore[arg-type]
    check_result_output(output, volume, post_processing is not None)
    blocks = list(blocks)
    if not blocks:
        raise GeometryError("no blocks given")
    plan = tables[0]["blocks"]
    for table in tables[1:]:
        if table["blocks"] != plan:
            raise RecordError("the hysteresis and size passes were merged over different block plans: use one plan for both")
    region = Box(tuple(min(b.start[a] for b in plan) for a in range(3)), tuple(max(b.end[a] for b in plan) for a in range(3)))  # type: ignore[arg-type]
    planned, seen = set(plan), set()
    for block in blocks:
        if block not in planned:
            raise GeometryError(f"block {block} is not one of the {len(plan)} blocks of the plan the merge was made for")
        if block in seen:
            raise GeometryError(f"block {block} is given twice: the blocks of one run must be distinct")
        seen.add(block)
        check_chunk_aligned(block, output.chunks, output.shape, region)
    kind = "post-processing" if post_processing is not None else "labels"
    fingerprint = run_fingerprint({"components": kind, "tables": [t["fingerprint"] for t in tables]})
    identity = block_identity(output.path)
    if identity is None:
        raise OutputError(f"the output dataset {output} no longer exists: create it again (create_volume.py)")

    results = []
    for block in blocks:
        t0 = time.perf_counter()
        result = WriteResult(block, post_processing is not None)
        if skip_done and block_is_done(output, block, fingerprint):
            result.skipped = True
        else:
            check_output_identity(output, identity)
            invalidate_overlapping_markers(output, block)
            output.remove_partial_chunk_files(block)  # what a killed run of this block left
            if post_processing is not None:
                data = _post_processed(volume, block, tables[0], tables[1], executor)
            else:
                labels, n, _ = local_labels(volume, block, PassSettings(**tables[0]["settings"]), executor)
                mapping = table_mapping(tables[0], block)
                data = mapping[labels]
                del labels
                result.objects = int(np.count_nonzero(np.unique(mapping[1:])))
            result.voxels = int(np.count_nonzero(data))
            output.write_chunked_zyx(block, data, executor)
            del data
            testhook.checkpoint("write:block-written")
            info = {"block": [list(block.start), list(block.end)], "components": kind, "input": dataset_identity(volume)}
            mark_block_done(output, block, fingerprint, identity, info)
        result.seconds = time.perf_counter() - t0
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _save_npz(path: Path, moment: str, **arrays) -> None:
    """Write ``path`` whole or not at all: to a temporary name, then renamed (``moment``: the test
    hook's checkpoint between the two)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    _write_atomically({path: write}, moment)


def _write_atomically(files: dict[Path, Callable[[Path], None]], moment: str) -> None:
    """Write each file through ``files[path](temporary)`` to a temporary sibling, then rename them
    all into place; what killed runs left beside these files (``.<name>.<pid>.partial``) is removed
    first. One job writes a given file at a time (one block's record, one merge), so a leftover is
    never another live writer's."""
    temporaries = {path: path.with_name(f".{path.name}.{os.getpid()}.partial") for path in files}
    try:
        for path in files:
            for leftover in path.parent.glob(f".{path.name}.*.partial"):
                leftover.unlink(missing_ok=True)
        for path, write in files.items():
            write(temporaries[path])
        testhook.checkpoint(moment)
        for path, tmp in temporaries.items():
            tmp.replace(path)
    except BaseException:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)
        raise



__all__ = [
    "HOST_SHAPES", "MergeResult", "PassSettings", "RecordError", "WriteResult", "block_labels", "block_record", "check_grid",
    "check_result_output", "checked_table", "connectivity_of", "merge_records", "object_columns", "physical_scale",
    "object_table_paths", "post_process_block", "post_processing_tables", "records_settings", "table_mapping",
    "write_block_record", "write_blocks", "write_object_table",
]
