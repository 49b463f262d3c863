"""bioimage.io model packages (spec 0.5) of the U-Net: the published ``neuron_2021.h5`` or any model
trained here, for bioimage.io core, deepImageJ, ilastik and plain TensorFlow/Keras.

A package is a folder (or the same as a zip) holding:

* ``rdf.yaml``: the description (format 0.5.12);
* the weights twice: ``keras_hdf5`` (the model file as it is when the package's tile is the file's own
  input shape, else the same weights re-saved at the tile shape) and ``tensorflow_saved_model_bundle``
  (``tf_saved_model.zip``: the Keras model of :func:`.unet.load_unet` exported with endpoint ``serve``
  and signature ``serving_default``, input ``raw`` -> output ``prediction``, raw logits);
* ``test_input.npy`` / ``test_output.npy``: a synthetic neurite volume and this project's
  :class:`.inference.Predictor` answer to it (softmax of the logits), checked against the exported
  SavedModel before the package is written;
* ``README.md`` (documentation), ``cover.png`` and the licence text when there is one.

**Axes.** ``batch, x, y, z, channel``: the network's kernels are stored for arrays in x,y,z order
(the original tool reads N5 into x,y,z), and the ``.h5`` is kept as it is, so the package names that
order; consumers map their images' axes by name.

**Sizes.** The Keras layers crop skip connections with static shapes, so every exported graph has
one fixed tile shape (default: the model file's own input shape, 220^3 for the published model).
The package declares that size; the network itself takes any edge ``s = 4 (mod 8), s >= 92`` (output
``s - 88``, a margin of 44 on every side), which the documentation and ``config`` state: export
another tile shape to use another size. The margin is the output's size offset (-88): the model
crops it itself, so no ``halo`` is declared (a halo is cropped from the output *again*).

**Scaling.** The model needs its input multiplied by a per-volume factor (:mod:`.scaling`, the
original log-histogram fit). bioimage.io has no such operation: the package declares
``scale_linear`` with one fixed gain (the test volume's factor, or the one given) and the
documentation says to replace it with each volume's own factor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import struct
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ModelError, OutputError, OutputExistsError, ParameterError
from .geometry import XYZ, format_xyz
from .volume import install_replacing

log = logging.getLogger(__name__)

FORMAT_VERSION = "0.5.12"
RDF_NAME = "rdf.yaml"
INPUT_ID, OUTPUT_ID = "raw", "prediction"
SAVED_MODEL = "tf_saved_model.zip"
TOLERANCE = 1e-4  # test output vs the exported SavedModel (probabilities)
PROJECT_URL = "https://github.com/JaneliaSciComp/exllsm-neuronseg"
ORIGINAL_URL = "https://github.com/JaneliaSciComp/exllsm-neuron-segmentation"
PROJECT_AUTHOR = "The exllsm-neuronseg contributors"
PAPER = {
    "text": (
        "Lillvis JL, Otsuna H, Ding X, et al. Rapid reconstruction of neural circuits using tissue expansion and "
        "light sheet microscopy. eLife 11:e81248 (2022)"
    ),
    "doi": "10.7554/eLife.81248",
}
# The published model (../shared/models/README.md): what its file cannot say about itself
PUBLISHED_SHA256 = "104d2eb50b3233d9dc226ae2a5efb9c45a4d42df5075bed74eb16c2410b0622a"
PUBLISHED = {
    "name": "ExLLSM neuron U-Net (neuron_2021)",
    "weights_authors": ["Cristian Goina", "Joshua L. Lillvis", "Linus Meienberg"],
    "tensorflow_version": "2.4",  # legacy HDF5, keras_version 2.3.0-tf, saved by TensorFlow 2.4
    "download": f"{ORIGINAL_URL}/raw/master/neuron_2021.h5",
}


@dataclass
class PackageResult:
    """What :func:`export_model_package` wrote."""

    path: Path
    model: Path
    tile: XYZ
    output_tile: XYZ
    scaling: float
    keras_as_is: bool
    max_difference: float
    seconds: float

    def summary(self) -> str:
        keras = "the .h5 as is" if self.keras_as_is else f"re-saved at the tile shape {format_xyz(self.tile)}"
        return (
            f"wrote {self.path}: bioimage.io {FORMAT_VERSION} package of {self.model.name} (keras_hdf5: {keras}; "
            f"tensorflow_saved_model_bundle), axes b,x,y,z,c, tile x,y,z {format_xyz(self.tile)} -> "
            f"{format_xyz(self.output_tile)}, scale_linear gain {self.scaling:.6g} (a per-volume factor: see its README), "
            f"SavedModel vs test output {self.max_difference:.1e}, in {self.seconds:.1f} s"
        )


def export_model_package(
    model_path: str | Path,
    output: str | Path,
    *,
    tile_shape: Sequence[int] | None = None,
    scaling: float | None = None,
    name: str | None = None,
    authors: Sequence[str] = (),
    license: str = "BSD-3-Clause",
    license_file: str | Path | None = None,
    overwrite: bool = False,
    warn: Callable[[str], None] = log.warning,
) -> PackageResult:
    """Write a bioimage.io 0.5 model package of a U-Net model file.

    Args:
        model_path: a model file this package reads (the published ``neuron_2021.h5`` or one trained here).
        output: the package folder, or a ``.zip`` file.
        tile_shape: input tile x,y,z of the exported graphs (default: the file's own input shape).
        scaling: the ``scale_linear`` gain (default: the test volume's own scaling factor).
        name: the model's name (default: the published model's, or the file's stem).
        authors: the package's authors (default: this project's contributors).
        license: SPDX identifier of the weights' licence.
        license_file: its text, packaged beside the weights (default: ``LICENSE-<stem>.txt`` or
            ``LICENSE`` beside the model file, if there is one).
        overwrite: replace an existing package at ``output``.

    Returns:
        :class:`PackageResult`, with a one-line ``summary()``.

    Raises:
        ModelError: a model file that is not this U-Net, or an export that does not reproduce it.
        GeometryError: a tile shape the model cannot take.
        ScalingError / ParameterError: a scaling factor or option that cannot be used.
        OutputExistsError / OutputError: the output exists (and ``overwrite`` is false, or it is not
            a model package), or cannot be written.

    **The package appears only once complete** (built under a temporary name, then renamed).
    """
    from .inference import Predictor
    from .scaling import check_scaling_factor
    from .unet import check_tile_shapes, margin, read_model_weights

    started = time.perf_counter()
    model_path, output = Path(model_path), Path(output)
    if not model_path.is_file():
        raise ModelError(f"model file {model_path} does not exist" if not model_path.exists() else f"model file {model_path} is not a file")
    data = model_path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    weights = read_model_weights(model_path, data=data)
    del data
    stored = weights.input_shape
    tile, out_tile = check_tile_shapes(tuple(tile_shape) if tile_shape is not None else stored or (220, 220, 220), None, weights.config.n_blocks)
    licence_text = _licence_file(model_path, license_file, license, warn)
    _check_output(output, overwrite)

    image = _test_volume(tile, out_tile, margin(weights.config.n_blocks))
    factor = check_scaling_factor(scaling if scaling is not None else _own_factor(image), image.dtype)
    predictor = Predictor(model_path, input_shape=tile)
    expected = softmax(predictor.predict_logits(image.astype(np.float32), scale=factor))

    token = uuid.uuid4().hex[:12]
    temporary = output.with_name(f".{output.name}.creating-{token}")  # the folder, or the zip file
    folder = temporary if output.suffix.lower() != ".zip" else output.with_name(f".{output.name}.creating-{token}.d")
    try:
        _discard_leftovers(output)
        folder.mkdir(parents=True)
        test_input = image.astype(np.float32)[None, ..., None]  # b,x,y,z,c
        test_output = expected[None]  # b,x,y,z,c
        np.save(folder / "test_input.npy", test_input, allow_pickle=False)
        np.save(folder / "test_output.npy", test_output, allow_pickle=False)
        keras_file, as_is = _keras_weights(model_path, folder, tile, stored)
        difference = _export_saved_model(model_path, folder, tile, test_input, factor, test_output)
        (folder / "cover.png").write_bytes(_cover(image, expected[..., 1], out_tile, factor))
        if licence_text is not None:
            shutil.copyfile(licence_text, folder / "LICENSE.txt")
        published = sha256 == PUBLISHED_SHA256
        description = _description(
            name=name or (PUBLISHED["name"] if published else model_path.stem),
            model=model_path,
            sha256=sha256,
            published=published,
            config=weights.config,
            tile=tile,
            out_tile=out_tile,
            factor=factor,
            keras_file=keras_file,
            as_is=as_is,
            keras_version=_keras_version(folder / keras_file),
            authors=list(authors) or [PROJECT_AUTHOR],
            license=license,
            licence_text=licence_text is not None,
            folder=folder,
        )
        (folder / "README.md").write_text(_documentation(description, model_path, published, tile, out_tile, factor, as_is))
        _hash_files(description, folder)
        (folder / RDF_NAME).write_text(to_yaml(description))
        if folder != temporary:
            _zip_folder(folder, temporary)
            shutil.rmtree(folder)
        install_replacing(temporary, output)
    except BaseException as exc:
        _remove(folder)
        _remove(temporary)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write the model package {output}: {exc.strerror or exc} ({exc.filename or output})") from exc
        raise
    return PackageResult(output, model_path, tile, out_tile, factor, as_is, difference, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Test tensors
# ---------------------------------------------------------------------------------------------


def _test_volume(tile: XYZ, out_tile: XYZ, context: int, seeds: int = 20) -> np.ndarray:
    """A synthetic neurite volume (uint16, x,y,z) of the tile's shape whose output box holds
    neurites: of the first ``seeds`` seeds, the one with the most neurite voxels there."""
    from .synthetic import SyntheticSpec, synthetic_volume

    best, best_count = None, -1
    box = tuple(slice(context, context + o) for o in out_tile)
    for seed in range(seeds):
        image, label = synthetic_volume(SyntheticSpec(shape=tile, n_tubes=6, n_puncta=20, seed=seed))
        count = int(label[box].sum())
        if count > best_count:
            best, best_count = image, count
        if count >= max(1, 0.001 * math.prod(out_tile)):
            break
    return best  # type: ignore[return-value]


def _own_factor(image: np.ndarray) -> float:
    """The test volume's own scaling factor (the original log-histogram fit)."""
    from .scaling import scaling_factor

    return float(scaling_factor(image))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64, returned as float32."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _keras_weights(model_path: Path, folder: Path, tile: XYZ, stored: XYZ | None) -> tuple[str, bool]:
    """The keras_hdf5 file and whether it is the model file as it is: it is when the file was saved
    for this tile shape and Keras rebuilds it (with this package's layer classes); otherwise the same
    weights in a model built at the tile shape, saved by Keras' legacy HDF5 writer (whose full
    functional graph ``keras.models.load_model`` rebuilds; :func:`.unet.save_unet`'s minimal layout
    is for this project's and the original tool's readers)."""
    import keras

    from .unet import custom_objects, load_unet

    if stored is not None and tuple(stored) == tuple(tile):
        try:
            keras.models.load_model(model_path, custom_objects=custom_objects(), compile=False)
        except Exception:  # noqa: BLE001 - any file Keras cannot rebuild is re-saved below
            pass
        else:
            shutil.copyfile(model_path, folder / model_path.name)
            return model_path.name, True
    name = f"{model_path.stem}-{'x'.join(map(str, tile))}.h5"
    model, _ = load_unet(model_path, input_shape=tile)
    with _quiet("absl"):  # "HDF5 is a legacy format": it is the one keras_hdf5 names
        model.save(folder / name)
    return name, False


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Messages below ERROR of the logger ``name`` (TensorFlow's, absl's) are dropped meanwhile."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def _keras_version(model_path: Path) -> str:
    import h5py

    with h5py.File(model_path, "r") as h5:
        value = h5.attrs.get("keras_version", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def _export_saved_model(model_path: Path, folder: Path, tile: XYZ, test_input: np.ndarray, factor: float, expected: np.ndarray) -> float:
    """Export the Keras model as a SavedModel (endpoint ``serve``, signature ``serving_default``:
    ``raw`` -> ``prediction``, logits), zipped; reload it and check it reproduces ``expected`` (the
    Predictor's probabilities) on the test input. Returns the largest difference."""
    import keras

    from .inference import import_tensorflow
    from .unet import load_unet

    tf = import_tensorflow()
    model, _ = load_unet(model_path, input_shape=tile)
    archive = keras.export.ExportArchive()
    archive.track(model)

    @tf.function(input_signature=[tf.TensorSpec((None, *tile, 1), tf.float32, name=INPUT_ID)])
    def serve(raw):
        return {OUTPUT_ID: model(raw, training=False)}

    archive.add_endpoint("serve", serve)
    bundle = folder / "tf_saved_model"
    with _quiet("tensorflow"):  # not "Assets written to: <temporary folder>"
        archive.write_out(str(bundle), verbose=False)
    signature = tf.saved_model.load(str(bundle)).signatures["serving_default"]
    scaled = test_input * np.float32(factor)
    got = softmax(signature(**{INPUT_ID: tf.constant(scaled)})[OUTPUT_ID].numpy())
    difference = float(np.abs(got - expected).max())
    if not difference <= TOLERANCE:
        raise ModelError(
            f"the exported SavedModel of {model_path} differs from this project's prediction by {difference:.3g} "
            f"(allowed {TOLERANCE:g}) on the test volume: the export is wrong; nothing was written"
        )
    _zip_folder(bundle, folder / SAVED_MODEL)
    shutil.rmtree(bundle)
    return difference


# ---------------------------------------------------------------------------------------------
# The description
# ---------------------------------------------------------------------------------------------


def _description(
    *,
    name: str,
    model: Path,
    sha256: str,
    published: bool,
    config,
    tile: XYZ,
    out_tile: XYZ,
    factor: float,
    keras_file: str,
    as_is: bool,
    keras_version: str,
    authors: list[str],
    license: str,
    licence_text: bool,
    folder: Path,
) -> dict:
    from .inference import import_tensorflow
    from .unet import margin, valid_input_sizes

    tf = import_tensorflow()
    m = margin(config.n_blocks)
    sizes = valid_input_sizes(config.n_blocks, 4096)
    weights_authors = [{"name": n} for n in (PUBLISHED["weights_authors"] if published else authors)]
    space_in = [{"type": "space", "id": axis, "size": size} for axis, size in zip("xyz", tile)]
    space_out = [
        {"type": "space", "id": axis, "size": {"tensor_id": INPUT_ID, "axis_id": axis, "offset": -2 * m}} for axis in "xyz"
    ]
    tf_version = tf.__version__
    keras_tf_version = PUBLISHED["tensorflow_version"] if published and as_is else tf_version
    keras_comment = (
        f"{'The model file as published' if as_is else f'The weights of {model.name}, saved by Keras for this tile shape'}: "
        f"legacy Keras HDF5 (keras_version {keras_version or 'unknown'}), input {format_xyz(tile)} x,y,z fixed, with "
        "the custom layer classes InputBlock, DownsampleBlock, BottleneckBlock, UpsampleBlock and OutputBlock: "
        "keras.models.load_model(path, custom_objects=exllsm_neuronseg.unet.custom_objects(), compile=False)."
    )
    description = {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": name,
        "description": (
            "3D U-Net segmenting neurons from background and non-specific antibody label in expansion + lattice "
            "light-sheet microscopy (ExLLSM) volumes: per-voxel probability of neuron. The input must first be "
            "multiplied by a per-volume scaling factor (see the documentation)."
        ),
        "authors": [{"name": a} for a in authors],
        "cite": [dict(PAPER), {"text": "ExLLSM neuron segmentation (the original tool and model)", "url": ORIGINAL_URL}],
        "license": license,
        "documentation": {"source": "README.md"},
        "covers": [{"source": "cover.png"}],
        "tags": ["3d", "unet", "semantic-segmentation", "neurons", "expansion-microscopy", "light-sheet", "fluorescence-light-microscopy", "drosophila", "tensorflow", "keras"],
        "git_repo": PROJECT_URL,
        "inputs": [
            {
                "id": INPUT_ID,
                "description": "Raw intensities (x,y,z). Preprocessing: times the volume's own scaling factor (the gain here is an example)",
                "axes": [{"type": "batch"}, *space_in, {"type": "channel", "channel_names": ["intensity"]}],
                "test_tensor": {"source": "test_input.npy"},
                "data": {"type": "float32"},
                "preprocessing": [{"id": "scale_linear", "kwargs": {"gain": factor, "offset": 0.0}}],
            }
        ],
        "outputs": [
            {
                "id": OUTPUT_ID,
                "description": f"Softmax: channel 1 = probability of neuron; the input's centre, {m} voxels smaller on every side",
                "axes": [{"type": "batch"}, *space_out, {"type": "channel", "channel_names": ["background", "neuron"]}],
                "test_tensor": {"source": "test_output.npy"},
                "data": {"type": "float32", "range": [0.0, 1.0]},
                "postprocessing": [{"id": "softmax", "kwargs": {"axis": "channel"}}],
            }
        ],
        "weights": {
            "keras_hdf5": {
                "source": keras_file,
                "tensorflow_version": keras_tf_version,
                "authors": weights_authors,
                "comment": keras_comment,
            },
            "tensorflow_saved_model_bundle": {
                "source": SAVED_MODEL,
                "tensorflow_version": tf_version,
                "parent": "keras_hdf5",
                "authors": [{"name": a} for a in authors],
                "comment": (
                    f"Exported by exllsm-neuronseg {__version__} with Keras 3 (ExportArchive): endpoint 'serve' and "
                    f"signature 'serving_default', input '{INPUT_ID}' (batch, {format_xyz(tile)}, 1) float32 -> output "
                    f"'{OUTPUT_ID}' (batch, {format_xyz(out_tile)}, 2) logits. No custom code needed."
                ),
            },
        },
        "config": {
            "exllsm_neuronseg": {
                "version": __version__,
                "model_file": model.name,
                "model_sha256": sha256,
                "n_blocks": config.n_blocks,
                "initial_filters": config.initial_filters,
                "tile_shape_xyz": list(tile),
                "output_tile_shape_xyz": list(out_tile),
                "margin": m,
                "valid_tile_edges": {"min": sizes[0], "step": sizes[1] - sizes[0], "output": f"edge - {2 * m}"},
                "scaling_factor": {
                    "example": factor,
                    "per_volume": True,
                    "method": "exllsm-neuronseg scaling_factor.py: slope of the log intensity histogram (original tool)",
                },
            }
        },
    }
    if published:
        description["config"]["exllsm_neuronseg"]["download"] = PUBLISHED["download"]
    if licence_text:
        description["attachments"] = [{"source": "LICENSE.txt"}]
    return description


def _hash_files(description: dict, folder: Path) -> None:
    """Add the sha256 of every packaged file the description names."""

    def visit(node) -> None:
        if isinstance(node, dict):
            source = node.get("source")
            if isinstance(source, str) and (folder / source).is_file():
                node["sha256"] = _sha256(folder / source)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(description)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _documentation(description: dict, model: Path, published: bool, tile: XYZ, out_tile: XYZ, factor: float, as_is: bool) -> str:
    config = description["config"]["exllsm_neuronseg"]
    edges = config["valid_tile_edges"]
    m = config["margin"]
    origin = (
        f"The published model `neuron_2021.h5` of the original tool ({ORIGINAL_URL}; download: {PUBLISHED['download']}), "
        "made for ExLLSM volumes of the Drosophila nervous system (the paper below)."
        if published
        else f"The model file `{model.name}` (sha256 `{config['model_sha256']}`), trained with exllsm-neuronseg."
    )
    return f"""# {description['name']}

{description['description']}

{origin} Packaged by exllsm-neuronseg {__version__} ({PROJECT_URL}).

## Input and its scaling

One channel of raw intensities, axes **x, y, z** (the order the network's kernels were trained in; tools
map their images' axes by name). The network expects intensities already multiplied by a **per-volume
scaling factor**: the slope of the volume's log intensity histogram (background decays tenfold every 0.5
scaled units), computed by the original tool's `volumeScalingFactor.py` or exllsm-neuronseg's
`scaling_factor.py` on the whole volume. After scaling the background must stay below about 0.05:
a constant 0.05 gives p = 0.005, a constant 0.1 already gives p = 0.99.

bioimage.io has no operation for this fit, so the package declares `scale_linear` with gain
**{factor:.6g}**, the factor of the package's own test volume. It is an example, not a constant of the
model: for your volume, put its factor into `rdf.yaml` (`inputs[0].preprocessing[0].kwargs.gain`),
or scale the image yourself and set the gain to 1 by removing that step.

## Tiles

This package's graphs take tiles of **{format_xyz(tile)}** voxels (x,y,z) and return the centre
**{format_xyz(out_tile)}**: the model consumes a margin of **{m} voxels on every side** (valid
convolutions), so the output size is the input size {-2 * m} on each axis (declared as the output's size
offset; there is no extra halo to crop). Tiles must overlap by {2 * m} voxels to cover a volume without
gaps, and the volume's border needs {m} voxels of padding (the original tool mirrors the image,
numpy `reflect`).

The network itself takes any tile edge **s = {edges['min']} + {edges['step']}·n** (s ≥ {edges['min']}, s ≡
{edges['min'] % edges['step']} mod {edges['step']}), output s − {2 * m}, per axis independently; its layers
fix the shape when a graph is built, so each package holds one. Export another shape with
`export_model.py --tile-shape X,Y,Z`. Larger tiles waste less work on margins (220³ computes 132³;
348×348×220 computes 260×260×132).

## Output and post-processing

Two channels: the softmax of the model's logits, channel 1 = probability of neuron. A binary mask is
the argmax (channel 1 > 0.5), as the original tool's `--as_binary_mask` writes it. The host pipeline's
optional post-processing (hysteresis 0.98/0.2, removal of objects under 1000 voxels, connected
components) is not part of the model.

## Weights

* `keras_hdf5`: `{description['weights']['keras_hdf5']['source']}`, {'the model file as published' if as_is else 'the same weights saved by Keras for this tile shape'}.
  Legacy Keras HDF5 with the custom layer classes `InputBlock`, `DownsampleBlock`, `BottleneckBlock`,
  `UpsampleBlock` and `OutputBlock` (exllsm-neuronseg's `unet` module, or the original tool's
  `unet/model.py`): `keras.models.load_model(path, custom_objects=exllsm_neuronseg.unet.custom_objects(),
  compile=False)`. A tool without these classes cannot load it{'; and the published file keeps its training configuration, whose loss Keras 3 cannot compile, so it loads only with compile=False (bioimageio.core compiles, and fails on it)' if as_is and published else ''}.
* `tensorflow_saved_model_bundle`: `{SAVED_MODEL}`, exported from the Keras model (TensorFlow
  {description['weights']['tensorflow_saved_model_bundle']['tensorflow_version']}); endpoint `serve`, signature
  `serving_default`: input `{INPUT_ID}` (batch, {format_xyz(tile)}, 1) float32, already scaled, ->
  output `{OUTPUT_ID}` (batch, {format_xyz(out_tile)}, 2) **logits** (the softmax is the declared
  post-processing). It needs no custom code (`tf.saved_model.load`, or
  `keras.layers.TFSMLayer(path, call_endpoint="serve")`): **the format for other tools**.

## Validation

The test tensors are a synthetic neurite volume (`test_input.npy`, raw counts, b,x,y,z,c) and the
answer of exllsm-neuronseg's own tile engine to it after scaling by {factor:.6g} (`test_output.npy`);
the exported SavedModel reproduces it to within {TOLERANCE:g} before the package is written
(`bioimageio.core`'s `test_model` on the SavedModel checks the same from the package). To validate the
model on your data, compare its masks with ground-truth annotations of independent samples (not used
in training), e.g. with exllsm-neuronseg's `evaluate_unet.py` (pixel accuracy, mean IoU,
precision-recall over thresholds) or the original tool's evaluation.

## Licence and citation

Licence: {description['license']}{' (text: `LICENSE.txt`)' if 'attachments' in description else ''}.
Please cite: {PAPER['text']}, doi:{PAPER['doi']}.
"""


def _cover(image: np.ndarray, probability: np.ndarray, out_tile: XYZ, factor: float) -> bytes:
    """A 2:1 PNG: the output box's middle z slice of the scaled input (grey) beside its probability."""
    m = [(i - o) // 2 for i, o in zip(image.shape, out_tile)]
    z = out_tile[2] // 2
    raw = image[m[0] : m[0] + out_tile[0], m[1] : m[1] + out_tile[1], m[2] + z].astype(np.float32) * np.float32(factor)
    left = np.clip(raw / max(float(np.percentile(raw, 99.5)), 1e-6), 0, 1).T  # rows y, columns x
    right = probability[:, :, z].T
    grey = (np.concatenate([left, right], axis=1) * 255).astype(np.uint8)
    scale = max(1, math.ceil(256 / grey.shape[0]))
    grey = np.repeat(np.repeat(grey, scale, axis=0), scale, axis=1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[:, rgb.shape[1] // 2 :, 1] //= 3  # probabilities in magenta
    return _png(rgb)


def _png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG (no imaging library needed)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + np.ascontiguousarray(rgb[y]).tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# YAML and files
# ---------------------------------------------------------------------------------------------


def to_yaml(value, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists, strings, numbers, booleans and None (what rdf.yaml holds):
    strings double-quoted (JSON escapes are YAML's), multi-line ones as literal blocks."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}\n"
        lines = []
        for key, item in value.items():
            if _is_block(item):
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item, indent + 2)}\n")
        return "".join(lines)
    if isinstance(value, list):
        if not value:
            return "[]\n"
        lines = []
        for item in value:
            if _is_block(item):
                text = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {text[indent + 2 :]}")
            else:
                lines.append(f"{pad}- {_scalar(item, indent + 2)}\n")
        return "".join(lines)
    return _scalar(value, indent) + "\n"


def _is_block(value) -> bool:
    return isinstance(value, (dict, list)) and bool(value)


def _scalar(value, indent: int) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return json.dumps(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} has no YAML form here (a description holds finite numbers)")
        text = repr(value)  # the shortest round-trip form; YAML 1.1 readers want a '.' before an exponent
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}{'' if '.' in mantissa else '.0'}e{exponent}" if e else text
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    text = str(value)
    if "\n" in text.rstrip("\n") and not text.startswith((" ", "\t")) and "\t" not in text:
        pad = " " * indent
        body = "".join(f"{pad}{line}\n" if line else "\n" for line in text.rstrip("\n").split("\n"))
        return "|" + ("" if text.endswith("\n") else "-") + "\n" + body.rstrip("\n")
    return json.dumps(text, ensure_ascii=False)


def _zip_folder(folder: Path, target: Path) -> None:
    """Zip a folder's files (paths relative to it, in a fixed order) into ``target``."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder).as_posix())


def _licence_file(model: Path, given: str | Path | None, license: str, warn: Callable[[str], None]) -> Path | None:
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise ParameterError(f"licence file {path} is not a readable file")
        return path
    for candidate in (model.with_name(f"LICENSE-{model.stem}.txt"), model.with_name("LICENSE"), model.with_name("LICENSE.txt")):
        if candidate.is_file():
            return candidate
    warn(
        f"no licence text beside {model} (LICENSE-{model.stem}.txt): the package names {license} only, and licences "
        "such as BSD-3-Clause require the text (with its copyright line) to travel with the weights; give the file"
    )
    return None


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{output} already exists; replace it explicitly or choose another output path")
        if output.is_symlink() or not _is_package(output):
            raise OutputError(
                f"{output} exists and is not a model package (no {RDF_NAME}): it is never replaced; remove it or "
                "choose another output path"
            )
    for p in (output.parent, *output.parent.parents):
        if p.exists():
            if not p.is_dir():
                raise OutputError(f"cannot create {output}: {p} is a file, not a directory")
            break


def _is_package(path: Path) -> bool:
    if path.is_dir():
        return (path / RDF_NAME).is_file()
    try:
        with zipfile.ZipFile(path) as archive:
            return RDF_NAME in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _discard_leftovers(output: Path) -> None:
    """What killed runs left beside the output: temporary packages, replaced ones not yet deleted."""
    for pattern in (f".{output.name}.creating-*", f".{output.name}.replaced-*"):
        for leftover in output.parent.glob(pattern):
            _remove(leftover)

