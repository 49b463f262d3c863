"""OME-Zarr (NGFF 0.4, zarr v2) copies of N5/zarr outputs, for napari, neuroglancer, Fiji and MoBIE.

Layout written (one image, its labels beside it, every array ``dimension_separator`` "/"):

* ``<output>/.zattrs``: ``multiscales`` (version 0.4, axes ``z, y, x`` of type space with the
  voxel size's unit, one dataset per level ``0, 1, ...``, each with a ``scale`` and, for coarse
  levels, a ``translation`` transform);
* ``<output>/0, 1, ...``: the image (probabilities, or any numeric dataset) level by level;
* ``<output>/labels/.zattrs``: ``{"labels": [names]}``;
* ``<output>/labels/<name>/``: an integer dataset (binary mask, connected-component ids) with the
  image's multiscales and ``image-label`` (``source.image`` = ``../../``).

**Axes.** N5 lists dimensions x,y,z; zarr and numpy see arrays z,y,x (C order). OME-Zarr stores
the same z,y,x order and names it in ``axes``, so the arrays are copied without a transpose; every
coordinate on this module's interface is still x,y,z.

**Levels.** A dataset named ``s0`` whose group also holds ``s1, s2, ...`` (the N5 pyramid layout of
BigDataViewer and n5-viewer), or a group given directly, is copied level by level; each level's
``downsamplingFactors`` (x,y,z, relative to s0) give its scale ``voxel size * factor`` and its
translation ``voxel size * (factor - 1) / 2`` (a coarse voxel is the mean, max or mode of the
``factor`` finer voxels it covers, so its centre is that far from s0's first voxel centre).
Any other dataset is one level. Labels must have the image's levels (same factors and shapes).

**Voxel size.** The image's ``pixelResolution`` (``{"dimensions": [x,y,z], "unit": "um"}`` or a
list) or ``resolution`` attribute; one given by the caller is used when the data has none (the
host's own outputs carry none). Without either, the scale is 1 voxel and the axes have no unit.

**Copying.** Level by level, in blocks aligned to the output chunks (and covering whole source
chunks where the grids allow), read and written by a thread pool: memory holds a few blocks,
never a level. Chunks that are all 0 are not written (readers fill them with 0). Everything is
written under a temporary hidden name beside the output and renamed into place at the end, so
the output path never holds a partial copy; an existing output is replaced only on request, and
only if it is an OME-Zarr image.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import GeometryError, OutputError, OutputExistsError, ParameterError, VolumeError
from .geometry import XYZ, Box, format_xyz, grid_cells
from .volume import (
    Volume,
    dataset_exists,
    discard_leftovers,
    downsampling_factors,
    install_replacing,
    input_attributes,
    io_executor,
    io_thread_count,
    normalise_dataset_path,
    open_volume,
    write_error_message,
)

log = logging.getLogger(__name__)

NGFF_VERSION = "0.4"
DEFAULT_MAX_CHUNK = 128  # output chunk edge cap: 512^3 N5 chunks are far too large for web viewers

# NGFF 0.4 space units (UDUNITS-2 names) and the spellings N5 attributes use for them
NGFF_SPACE_UNITS = frozenset(
    "angstrom attometer centimeter decimeter exameter femtometer foot gigameter hectometer inch kilometer "
    "megameter meter micrometer mile millimeter nanometer parsec petameter picometer terameter yard "
    "yoctometer yottameter zeptometer zettameter".split()
)
_UNIT_ALIASES = {
    "um": "micrometer", "µm": "micrometer", "μm": "micrometer", "micron": "micrometer", "microns": "micrometer",
    "micrometers": "micrometer", "nm": "nanometer", "nanometers": "nanometer", "mm": "millimeter",
    "millimeters": "millimeter", "cm": "centimeter", "m": "meter", "meters": "meter", "pm": "picometer",
    "a": "angstrom", "å": "angstrom", "angstroms": "angstrom",
}  # fmt: skip
_NO_UNIT = {"", "pixel", "pixels", "px", "voxel", "voxels"}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


# ---------------------------------------------------------------------------------------------
# What is copied
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One resolution level of a source: the dataset and its factors x,y,z relative to level 0."""

    volume: Volume
    factors: XYZ


@dataclass
class Source:
    """A dataset to copy (the image or one label) with its levels, finest first."""

    name: str
    levels: list[Level]

    @property
    def base(self) -> Volume:
        return self.levels[0].volume

    def describe(self) -> str:
        return f"{self.base}" + (f" ({len(self.levels)} levels)" if len(self.levels) > 1 else "")


@dataclass
class OmeZarrResult:
    """What :func:`write_ome_zarr` wrote."""

    path: Path
    image: Source
    labels: list[Source]
    voxel_size: tuple[float, float, float] | None
    unit: str | None
    blocks: int
    seconds: float
    chunks: XYZ = field(default=(0, 0, 0))

    def summary(self) -> str:
        base = self.image.base
        size = (
            f"voxel {','.join(f'{v:g}' for v in self.voxel_size)} {self.unit or '(no unit)'}"
            if self.voxel_size is not None
            else "no voxel size (scale 1 voxel)"
        )
        labels = f", labels {', '.join(s.name for s in self.labels)}" if self.labels else ", no labels"
        return (
            f"wrote {self.path}: image {base} ({format_xyz(base.shape)} x,y,z = z,y,x {format_xyz(base.shape[::-1])} "
            f"on disk, {base.dtype}, {len(self.image.levels)} level{'s' if len(self.image.levels) != 1 else ''}, "
            f"{size}){labels}; chunks z,y,x {format_xyz(self.chunks[::-1])}, {self.blocks} blocks in {self.seconds:.1f} s"
        )


def parse_label_spec(spec: str, image_container: str) -> tuple[str, str, str]:
    """``NAME=CONTAINER:DATASET`` (or ``NAME=DATASET``: a dataset of the image's container) as
    (name, container, dataset); the container is split off at the last colon."""
    name, equals, where = spec.partition("=")
    name = name.strip()
    if not equals or not where.strip():
        raise ParameterError(
            f"label {spec!r} is not NAME=CONTAINER:DATASET (e.g. mask=/data/seg.n5:/mask/s0, or mask=/mask/s0 "
            "for a dataset of the image's container)"
        )
    container, colon, dataset = where.rpartition(":")
    if not colon:
        container, dataset = image_container, where
    if not container.strip() or not dataset.strip():
        raise ParameterError(f"label {spec!r} is not NAME=CONTAINER:DATASET (e.g. mask=/data/seg.n5:/mask/s0)")
    return name, container, dataset


def parse_voxel_size(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"x,y,z"`` (or one number for all three) as three positive finite floats."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    if len(parts) == 1:
        parts = parts * 3
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ParameterError(f"voxel size {text!r} is not three positive numbers x,y,z (e.g. 0.104,0.104,0.18)")
    return values  # type: ignore[return-value]


def ngff_unit(unit: str | None, warn: Callable[[str], None] = log.warning) -> str | None:
    """The NGFF 0.4 name of a length unit (``um`` -> ``micrometer``); None for none, for pixels and
    voxels, and (with a warning) for a unit NGFF does not name."""
    if unit is None:
        return None
    key = str(unit).strip()
    if key.lower() in _NO_UNIT:
        return None
    if key.lower() in NGFF_SPACE_UNITS:
        return key.lower()
    named = _UNIT_ALIASES.get(key.lower()) or _UNIT_ALIASES.get(key)
    if named is None:
        warn(f"unit {unit!r} is not a length unit NGFF 0.4 names (e.g. micrometer, nanometer): axes written without a unit")
    return named


def dataset_voxel_size(volume: Volume) -> tuple[tuple[float, float, float] | None, str | None]:
    """The voxel size x,y,z and unit in a dataset's attributes: ``pixelResolution`` (n5-viewer's
    ``{"dimensions": [...], "unit": ...}`` or a list), else ``resolution`` (with ``units``);
    (None, None) when it has neither. A malformed value raises :class:`GeometryError`."""
    attributes = input_attributes(volume)
    value, unit = attributes.get("pixelResolution"), None
    if isinstance(value, dict):
        value, unit = value.get("dimensions"), value.get("unit")
    if value is None:
        value = attributes.get("resolution")
    if value is None:
        return None, None
    units = attributes.get("units")
    if unit is None and isinstance(units, list) and units and isinstance(units[0], str):
        unit = units[0]
    try:
        return parse_voxel_size(value if isinstance(value, (list, tuple)) else str(value)), unit
    except ParameterError:
        raise GeometryError(
            f"{volume} has voxel size {value!r} (pixelResolution or resolution), not three positive numbers x,y,z: "
            "correct the dataset's attributes"
        ) from None


def open_levels(container: str, dataset: str, name: str) -> Source:
    """The levels of ``container:dataset``: the dataset alone, or, for a dataset named ``s0`` with
    siblings ``s1, ...`` (or a group holding ``s0, s1, ...``), every level, checked (dtype,
    ``downsamplingFactors`` multiples of s0's, shapes ``s0 / factor`` rounded either way)."""
    dataset = normalise_dataset_path(dataset)
    try:
        volume = open_volume(container, dataset)
    except VolumeError:
        if not dataset_exists(container, f"{dataset}/s0"):
            raise
        group = dataset
    else:
        parent, _, leaf = dataset.rpartition("/")
        if leaf != "s0" or not dataset_exists(container, f"{parent}/s1".lstrip("/")):
            return Source(name, [Level(volume, (1, 1, 1))])
        group = parent
    prefix = f"{group}/" if group else ""
    volumes = []
    while dataset_exists(container, f"{prefix}s{len(volumes)}"):
        volumes.append(open_volume(container, f"{prefix}s{len(volumes)}"))
    base_factors = downsampling_factors(volumes[0])
    levels = []
    for volume in volumes:
        factors = downsampling_factors(volume)
        if volume.dtype != volumes[0].dtype:
            raise VolumeError(f"{volume} is {volume.dtype} but {volumes[0]} is {volumes[0].dtype}: not one pyramid")
        if any(f % b for f, b in zip(factors, base_factors)):
            raise VolumeError(
                f"{volume} has downsamplingFactors {format_xyz(factors)}, not a multiple of {volumes[0]}'s "
                f"{format_xyz(base_factors)}"
            )
        relative = tuple(f // b for f, b in zip(factors, base_factors))
        if any(abs(n * r - n0) >= r for n, r, n0 in zip(volume.shape, relative, volumes[0].shape)):
            raise VolumeError(
                f"{volume} has shape {format_xyz(volume.shape)}, not {volumes[0]}'s {format_xyz(volumes[0].shape)} "
                f"divided by its downsamplingFactors {format_xyz(relative)}: not one pyramid"
            )
        levels.append(Level(volume, relative))  # type: ignore[arg-type]
    return Source(name, levels)


# ---------------------------------------------------------------------------------------------
# NGFF metadata
# ---------------------------------------------------------------------------------------------


def multiscales(
    source: Source, voxel_size: Sequence[float] | None, unit: str | None, name: str, metadata: dict | None = None
) -> list[dict]:
    """The NGFF 0.4 ``multiscales`` attribute of ``source``: axes z,y,x, per level the physical
    scale (z,y,x) and, for downsampled levels, the translation of its first voxel centre."""
    size = tuple(voxel_size) if voxel_size is not None else (1.0, 1.0, 1.0)
    datasets = []
    for index, level in enumerate(source.levels):
        scale = [float(v * f) for v, f in zip(size, level.factors)][::-1]
        transforms: list[dict] = [{"type": "scale", "scale": scale}]
        if level.factors != (1, 1, 1):
            shift = [float(v * (f - 1) / 2) for v, f in zip(size, level.factors)][::-1]
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(index), "coordinateTransformations": transforms})
    axes = [{"name": axis, "type": "space", **({"unit": unit} if unit else {})} for axis in "zyx"]
    entry = {"version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets}
    if metadata:
        entry["metadata"] = metadata
    return [entry]


def _source_metadata(source: Source) -> dict:
    """Where a copy came from: the source dataset and its own attributes (provenance included)."""
    try:
        attributes = dict(source.base.array.attrs)
    except (ValueError, KeyError):
        attributes = {}
    return {
        "source": f"{source.base}",
        "levels": [f"{level.volume}" for level in source.levels],
        "attributes": attributes,
        "written_by": f"exllsm-neuronseg {__version__} (to_ome_zarr)",
    }


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def output_chunks(source: Volume, chunks: Sequence[int] | None = None, cap: int = DEFAULT_MAX_CHUNK) -> XYZ:
    """Output chunk shape x,y,z: ``chunks`` if given, else the source's chunks with each edge at most ``cap``."""
    if chunks is not None:
        values = tuple(int(c) for c in chunks)
        if len(values) != 3 or min(values) < 1:
            raise ParameterError(f"chunk shape {tuple(chunks)} is not three positive integers x,y,z")
        return values  # type: ignore[return-value]
    return tuple(min(c, cap) for c in source.chunks)  # type: ignore[return-value]


def copy_block_shape(source_chunks: XYZ, chunks: XYZ) -> XYZ:
    """The copy unit x,y,z: a whole number of output chunks covering one source chunk, so that blocks
    never share an output chunk and, where the grids nest, each source chunk is decoded once."""
    return tuple(c * -(-s // c) for s, c in zip(source_chunks, chunks))  # type: ignore[return-value]


def write_ome_zarr(
    output: str | Path,
    image_container: str,
    image_dataset: str,
    labels: Sequence[tuple[str, str, str]] = (),
    *,
    name: str | None = None,
    chunks: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    overwrite: bool = False,
    io_threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] = log.warning,
) -> OmeZarrResult:
    """Copy an image dataset (and integer label datasets of the same shape) into a new OME-Zarr.

    Args:
        output: the OME-Zarr directory to write (conventionally ``*.ome.zarr``).
        image_container, image_dataset: the image (e.g. probabilities ``/data/seg.n5``, ``/s0``); a
            dataset ``s0`` with sibling levels, or a group of levels, gives a multiscale image.
        labels: ``(name, container, dataset)`` of each label image (uint8 masks, uint64 components):
            integer datasets with the image's levels and shapes.
        name: the image's name in the metadata (default: the dataset's group, or the container's stem).
        chunks: output chunk shape x,y,z (default: the source's, each edge at most 128).
        voxel_size, unit: x,y,z voxel size and its unit, used when the image carries none.
        overwrite: replace an existing OME-Zarr image at ``output``.
        io_threads: threads copying blocks (default: cores, 2..8).
        progress: called with (blocks done, blocks in all) as blocks finish.

    Returns:
        :class:`OmeZarrResult`, with a one-line ``summary()``.

    Raises:
        VolumeError: a missing or unreadable source, or levels that are not one pyramid.
        GeometryError: labels whose levels or shapes differ from the image's, malformed voxel sizes.
        ParameterError: bad label names, chunk shapes, voxel sizes or label dtypes.
        OutputExistsError / OutputError: the output exists (and ``overwrite`` is false, or it is not an
            OME-Zarr image), lies over a source, or cannot be written.

    Everything is checked before anything is written; **the output appears only once complete**.
    """
    started = time.perf_counter()
    output = Path(output)
    image = open_levels(image_container, image_dataset, "image")
    sources = [_open_label(image, *label) for label in labels]
    size, found_unit = _voxel_size(image, sources, voxel_size, unit, warn)
    unit_name = ngff_unit(found_unit, warn) if size is not None else None
    chunk_shape = output_chunks(image.base, chunks)
    _check_output(output, [image, *sources], overwrite)
    image_name = name or _default_name(image)

    temporary = output.with_name(f".{output.name}.creating-{uuid.uuid4().hex[:12]}")
    try:
        discard_leftovers(output)  # what killed runs left beside it
        blocks = _write_tree(temporary, image, sources, size, unit_name, image_name, chunk_shape, io_threads, progress, warn)
        install_replacing(temporary, output)
    except BaseException as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        error = _os_error(exc)
        if error is not None:  # reading errors arrive as ChunkError: an OSError here is the output's
            raise OutputError(write_error_message(f"the OME-Zarr {output}", error, output.parent)) from exc
        raise
    return OmeZarrResult(output, image, sources, size, unit_name, blocks, time.perf_counter() - started, chunk_shape)


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError an exception is or was raised from (zarr's stores wrap a failed mkdir in KeyError)."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        if not isinstance(exc, (KeyError, OSError)):
            return None
        exc = exc.__cause__ or exc.__context__
    return None


def _open_label(image: Source, name: str, container: str, dataset: str) -> Source:
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ParameterError(
            f"label name {name!r} is not a simple name (letters, digits, '_', '.', '-'; e.g. mask, components)"
        )
    label = open_levels(container, dataset, name)
    if label.base.dtype.kind not in "ui":
        raise ParameterError(
            f"label {name} ({label.base}) is {label.base.dtype}: labels are integer datasets (uint8 masks, uint64 "
            "connected components); give probabilities as the image"
        )
    if len(label.levels) != len(image.levels) or any(
        a.factors != b.factors or a.volume.shape != b.volume.shape for a, b in zip(label.levels, image.levels)
    ):
        raise GeometryError(
            f"label {name} ({label.describe()}: {_level_shapes(label)}) does not have the image's levels "
            f"({image.describe()}: {_level_shapes(image)}); a label needs the same levels and shapes x,y,z as its image"
        )
    return label


def _level_shapes(source: Source) -> str:
    return "; ".join(format_xyz(level.volume.shape) for level in source.levels)


def _voxel_size(
    image: Source,
    labels: list[Source],
    given: Sequence[float] | None,
    given_unit: str | None,
    warn: Callable[[str], None],
) -> tuple[tuple[float, float, float] | None, str | None]:
    """The image's own voxel size (else a label's, else the given one); a label with a different one
    is refused, a given one that differs from the data's is ignored with a warning."""
    found = [(source, *dataset_voxel_size(source.base)) for source in (image, *labels)]
    known = [(source, size, unit) for source, size, unit in found if size is not None]
    for source, size, unit in known[1:]:
        if not np.allclose(size, known[0][1], rtol=1e-6):
            raise GeometryError(
                f"{source.base} has voxel size {size} but {known[0][0].base} has {known[0][1]}: "
                "the image and its labels must be the same grid"
            )
    given_size = parse_voxel_size(given) if given is not None else None
    if known:
        size, unit = known[0][1], known[0][2]
        if given_size is not None and not np.allclose(given_size, size, rtol=1e-6):
            warn(f"{known[0][0].base} has voxel size {','.join(map(str, size))}: the one given ({given}) is ignored")
        return size, unit if unit is not None else given_unit
    return given_size, given_unit if given_size is not None else None


def _default_name(image: Source) -> str:
    parts = [p for p in image.base.dataset.split("/") if p]
    if parts and parts[-1] == "s0":
        parts = parts[:-1]
    return parts[-1] if parts else Path(image.base.container).name.split(".")[0]


def _check_output(output: Path, sources: list[Source], overwrite: bool) -> None:
    """The output must not be (or hold) a source container; an existing one is replaced only on
    request and only when it is an OME-Zarr image (never an arbitrary folder)."""
    resolved = output.resolve()
    for source in sources:
        container = Path(source.base.container).resolve()
        if resolved == container or resolved in container.parents:
            raise OutputError(
                f"output {output} is or holds the source container {source.base.container}: write the OME-Zarr elsewhere"
            )
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{output} already exists; replace it explicitly or choose another output path")
        if output.is_symlink() or not _is_ome_zarr_image(output):
            raise OutputError(
                f"{output} exists and is not an OME-Zarr image (no multiscales in its .zattrs): it is never replaced; "
                "remove it or choose another output path"
            )
    parent = output.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise OutputError(f"cannot create {output}: {p} is a file, not a directory")
            break


def _is_ome_zarr_image(path: Path) -> bool:
    try:
        attributes = json.loads((path / ".zattrs").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(attributes, dict) and "multiscales" in attributes


def _write_tree(
    root: Path,
    image: Source,
    labels: list[Source],
    voxel_size: tuple[float, float, float] | None,
    unit: str | None,
    name: str,
    chunks: XYZ,
    io_threads: int | None,
    progress: Callable[[int, int], None] | None,
    warn: Callable[[str], None],
) -> int:
    """Write the whole OME-Zarr under ``root``; returns the number of blocks copied."""
    import zarr

    from .codecs import compressor

    store = zarr.DirectoryStore(str(root))
    group = zarr.open_group(store=store, mode="w-")
    copies: list[tuple[Volume, zarr.Array, XYZ]] = []

    def add_arrays(target: zarr.Group, source: Source) -> None:
        for index, level in enumerate(source.levels):
            volume = level.volume
            array = target.create_dataset(
                str(index),
                shape=volume.array.shape,  # z,y,x, as the source stores it
                chunks=tuple(min(c, n) for c, n in zip(chunks, volume.shape))[::-1],
                dtype=volume.dtype,
                compressor=compressor("gzip", 1),
                fill_value=0,
                dimension_separator="/",
                write_empty_chunks=False,
            )
            copies.append((volume, array, copy_block_shape(volume.chunks, tuple(reversed(array.chunks)))))

    add_arrays(group, image)
    group.attrs["multiscales"] = multiscales(image, voxel_size, unit, name, _source_metadata(image))
    if labels:
        label_group = group.create_group("labels")
        label_group.attrs["labels"] = [label.name for label in labels]
        for label in labels:
            target = label_group.create_group(label.name)
            add_arrays(target, label)
            target.attrs.update(
                {
                    "multiscales": multiscales(label, voxel_size, unit, label.name, _source_metadata(label)),
                    "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"}},
                }
            )
    work = [(volume, array, box) for volume, array, block in copies for box in grid_cells(volume.box, block)]
    _copy_blocks(work, io_thread_count(io_threads, warn), progress)
    return len(work)


def _copy_block(volume: Volume, array, box: Box) -> None:
    (x0, y0, z0), (x1, y1, z1) = box.start, box.end
    array[z0:z1, y0:y1, x0:x1] = volume.read_zyx(box)


def _copy_blocks(work: list, threads: int, progress: Callable[[int, int], None] | None) -> None:
    """Copy every (volume, array, box) with ``threads`` workers, at most two blocks per worker in
    flight; the first failure stops the copy and is raised."""
    total, done = len(work), 0
    pending: set = set()
    items = iter(work)
    with io_executor(threads) as pool:
        try:
            while True:
                while len(pending) < 2 * threads:
                    item = next(items, None)
                    if item is None:
                        break
                    pending.add(pool.submit(_copy_block, *item))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()
                done += len(finished)
                if progress is not None:
                    progress(done, total)
        finally:
            for future in pending:
                future.cancel()
