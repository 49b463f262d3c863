"""bioimage.io model packages (export_model.py, model_package.py): validated offline by
bioimageio.spec, the SavedModel run the way bioimageio.core runs TensorFlow 2 weights (a Keras
TFSMLayer on endpoint 'serve', with the description's pre- and post-processing) reproduces the test
output, the test output is this project's own prediction, and bad inputs write nothing.

bioimageio.core itself is not installed: its latest release (0.11.0) pins bioimageio.spec 0.5.12.0,
which fails on every file entry under the pydantic 2.14 this project pins (its serializer passes
pydantic's SerializationInfo where pydantic now wants an index key). Run with an older pydantic
outside this venv, core 0.11.0 passes its test_model on these packages' tensorflow_saved_model_bundle
(see docs/outputs.md).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_script

# URLs the description names: known to the validator, so validation stays offline
URLS = {
    "https://github.com/JaneliaSciComp/exllsm-neuronseg": None,
    "https://github.com/JaneliaSciComp/exllsm-neuron-segmentation": None,
}
TILE = (100, 100, 100)


def export(*args: str):
    return run_script("export_model.py", *args)


@pytest.fixture(scope="module")
def package(model_path, tmp_path_factory) -> Path:
    """The published model exported at a 100^3 tile (its .h5 re-saved at that shape), as a folder."""
    output = tmp_path_factory.mktemp("package") / "neuron"
    proc = export("-m", str(model_path), "-o", str(output), "--tile-shape", ",".join(map(str, TILE)))
    assert proc.returncode == 0, proc.stderr
    assert not proc.stderr.strip(), proc.stderr  # no TensorFlow or Keras chatter
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {output}: bioimage.io 0.5.12 package of neuron_2021.h5")
    assert "tile x,y,z 100,100,100 -> 12,12,12" in lines[0]
    return output


def load(source: Path):
    from bioimageio.spec import load_description
    from bioimageio.spec.model.v0_5 import ModelDescr

    descr = load_description(source, perform_io_checks=True, known_files=dict(URLS))
    summary = descr.validation_summary
    errors = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.errors]
    assert isinstance(descr, ModelDescr), errors
    assert summary.status in ("valid-format", "passed"), errors
    # the only remarks: no sample tensors (images for a website preview), which FAIR scoring asks for
    warned = {str(w.loc[-1]) for d in summary.details for w in d.warnings}
    assert warned <= {"sample_tensor"}, warned
    return descr


def test_package_validates_offline(package):
    descr = load(package / "rdf.yaml")
    (raw,), (prediction,) = descr.inputs, descr.outputs
    assert [a.type for a in raw.axes] == ["batch", "space", "space", "space", "channel"]
    assert [str(a.id) for a in raw.axes[1:4]] == ["x", "y", "z"] and [a.size for a in raw.axes[1:4]] == list(TILE)
    for axis in prediction.axes[1:4]:  # the 44-voxel margin, cropped by the model itself: size offset -88
        assert axis.size.tensor_id == "raw" and axis.size.offset == -88 and not hasattr(axis, "halo")
    assert [str(n) for n in prediction.axes[4].channel_names] == ["background", "neuron"]
    (scale,) = [step for step in raw.preprocessing if step.id == "scale_linear"]  # the loader adds ensure_dtype steps
    (soft,) = [step for step in prediction.postprocessing if step.id == "softmax"]
    assert scale.kwargs.gain > 0 and str(soft.kwargs.axis) == "channel"
    assert descr.weights.keras_hdf5 is not None and descr.weights.tensorflow_saved_model_bundle is not None
    assert descr.weights.tensorflow_saved_model_bundle.parent == "keras_hdf5"
    assert str(descr.license) == "BSD-3-Clause" and (package / "LICENSE.txt").read_text().startswith("BSD 3-Clause")
    assert "Howard Hughes Medical Institute" in (package / "LICENSE.txt").read_text()
    assert [str(c.doi) for c in descr.cite if c.doi] == ["10.7554/eLife.81248"]
    readme = (package / "README.md").read_text()
    for words in ("## Validation", "per-volume", "44 voxels on every side", "s = 92 + 8·n", "custom_objects"):
        assert words in readme, words
    config = yaml.safe_load((package / "rdf.yaml").read_text())["config"]["exllsm_neuronseg"]
    assert config["valid_tile_edges"] == {"min": 92, "step": 8, "output": "edge - 88"} and config["margin"] == 44
    assert config["scaling_factor"]["per_volume"] is True
    assert (package / "cover.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_named_file_has_its_sha256(package):
    description = yaml.safe_load((package / "rdf.yaml").read_text())
    entries = []

    def visit(node):
        if isinstance(node, dict):
            if "source" in node:
                entries.append(node)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(description)
    assert {e["source"] for e in entries} >= {"test_input.npy", "test_output.npy", "tf_saved_model.zip", "README.md"}
    for entry in entries:
        assert hashlib.sha256((package / entry["source"]).read_bytes()).hexdigest() == entry["sha256"], entry


def scaled_input(package: Path) -> tuple[np.ndarray, np.ndarray, float]:
    description = yaml.safe_load((package / "rdf.yaml").read_text())
    gain = description["inputs"][0]["preprocessing"][0]["kwargs"]["gain"]
    test_input = np.load(package / "test_input.npy")
    return test_input, np.load(package / "test_output.npy"), gain


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_saved_model_reproduces_the_test_output_as_bioimageio_core_runs_it(package, tmp_path):
    """bioimageio.core's TensorFlow 2 adapter: unzip, keras.layers.TFSMLayer(call_endpoint='serve'),
    the dict's values as outputs; then the declared scale_linear before and softmax after."""
    import keras

    from exllsm_neuronseg.inference import import_tensorflow

    tf = import_tensorflow()
    with zipfile.ZipFile(package / "tf_saved_model.zip") as archive:
        archive.extractall(tmp_path / "bundle")
    layer = keras.layers.TFSMLayer(str(tmp_path / "bundle"), call_endpoint="serve")
    test_input, test_output, gain = scaled_input(package)
    result = layer(tf.convert_to_tensor(test_input * np.float32(gain)))
    assert isinstance(result, dict) and list(result) == ["prediction"]
    got = softmax(np.asarray(result["prediction"]))
    assert got.shape == test_output.shape == (1, 12, 12, 12, 2)
    np.testing.assert_allclose(got, test_output, atol=1e-4, rtol=0)
    # a batch of two, as bioimageio.core also runs it
    double = layer(tf.convert_to_tensor(np.concatenate([test_input, test_input]) * np.float32(gain)))["prediction"]
    np.testing.assert_allclose(softmax(np.asarray(double))[1], test_output[0], atol=1e-4, rtol=0)


def test_test_output_is_this_projects_prediction(package, model_path):
    from exllsm_neuronseg.inference import Predictor

    test_input, test_output, gain = scaled_input(package)
    probability = Predictor(model_path, input_shape=TILE).predict(test_input[0, ..., 0], scale=gain)
    np.testing.assert_allclose(test_output[0, ..., 1], probability, atol=1e-6, rtol=0)
    np.testing.assert_allclose(test_output.sum(axis=-1), 1.0, atol=1e-6)
    assert (test_output[..., 1] > 0.5).any() and (test_output[..., 1] < 0.5).any()  # neurites and background


def test_keras_hdf5_loads_with_the_layer_classes(package):
    import keras

    from exllsm_neuronseg.unet import custom_objects

    source = yaml.safe_load((package / "rdf.yaml").read_text())["weights"]["keras_hdf5"]["source"]
    assert source == "neuron_2021-100x100x100.h5"  # the published file takes 220^3 only: re-saved
    model = keras.models.load_model(package / source, custom_objects=custom_objects(), compile=False)
    test_input, test_output, gain = scaled_input(package)
    got = softmax(model.predict(test_input * np.float32(gain), verbose=0))
    np.testing.assert_allclose(got, test_output, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_published_model_at_its_own_tile_keeps_the_h5_as_is(model_path, tmp_path):
    from exllsm_neuronseg.model_package import PUBLISHED_SHA256

    output = tmp_path / "neuron_2021.zip"
    proc = export("-m", str(model_path), "-o", str(output), "--scaling", "0.00045")
    assert proc.returncode == 0, proc.stderr
    assert "keras_hdf5: the .h5 as is" in proc.stdout and "220,220,220 -> 132,132,132" in proc.stdout
    descr = load(output)
    assert [step.kwargs.gain for step in descr.inputs[0].preprocessing if step.id == "scale_linear"] == [0.00045]
    keras_weights = descr.weights.keras_hdf5
    assert str(keras_weights.sha256) == PUBLISHED_SHA256 and str(keras_weights.tensorflow_version) == "2.4"
    with zipfile.ZipFile(output) as archive:
        names = set(archive.namelist())
        assert hashlib.sha256(archive.read("neuron_2021.h5")).hexdigest() == PUBLISHED_SHA256
        assert np.load(archive.open("test_input.npy")).shape == (1, 220, 220, 220, 1)
    assert {"rdf.yaml", "README.md", "LICENSE.txt", "cover.png", "tf_saved_model.zip", "test_output.npy"} <= names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neuron_2021.zip"]


def assert_failed_cleanly(proc, output: Path, *words: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not output.exists()
    assert not [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]


@pytest.mark.parametrize(
    "args, words",
    [
        (["-m", "/nonexistent/model.h5"], ["model file /nonexistent/model.h5 does not exist"]),
        (["--tile-shape", "101,100,100"], ["edge 101 is not allowed", "s >= 92"]),
        (["--scaling=-1"], ["scaling factor -1.0 cannot be used"]),
        (["--license-file", "/nonexistent/LICENSE"], ["licence file /nonexistent/LICENSE"]),
    ],
)
def test_bad_inputs_write_nothing(model_path, tmp_path, args, words):
    output = tmp_path / "package"
    args = args if "-m" in args else ["-m", str(model_path), *args]
    assert_failed_cleanly(export(*args, "-o", str(output)), output, *words)


def test_a_file_that_is_not_a_model(tmp_path):
    fake = tmp_path / "model.h5"
    fake.write_text("not HDF5")
    output = tmp_path / "package"
    assert_failed_cleanly(export("-m", str(fake), "-o", str(output)), output, "not a readable HDF5 file")


def test_existing_outputs(package, model_path, tmp_path):
    proc = export("-m", str(model_path), "-o", str(package), "--tile-shape", "100,100,100")
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--overwrite replaces it" in proc.stderr
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    proc = export("-m", str(model_path), "-o", str(folder), "--overwrite")
    assert proc.returncode == 2 and "is not a model package" in proc.stderr
    assert (folder / "notes.txt").read_text() == "keep"


def test_a_failed_export_leaves_nothing(model_path, tmp_path, monkeypatch):
    from exllsm_neuronseg import model_package
    from exllsm_neuronseg.errors import ModelError

    def broken(*args, **kwargs):
        raise ModelError("the exported SavedModel differs")

    monkeypatch.setattr(model_package, "_export_saved_model", broken)
    output = tmp_path / "package.zip"
    with pytest.raises(ModelError, match="differs"):
        model_package.export_model_package(model_path, output, tile_shape=TILE, scaling=0.00045)
    assert list(tmp_path.iterdir()) == []


def test_yaml_round_trips():
    from exllsm_neuronseg.model_package import to_yaml

    value = {
        "text": 'a "quoted" µm line: with # and - signs',
        "block": "two\nlines\n",
        "numbers": [1, -88, 0.00042419620541273256, 1e-30],
        "flags": [True, False, None],
        "empty": [],
        "nested": [{"id": "scale_linear", "kwargs": {"gain": 0.5, "offset": 0.0}}, ["a", "b"]],
        "digits": "0.5.12",
    }
    assert yaml.safe_load(to_yaml(value)) == value
    assert json.loads(json.dumps(yaml.safe_load(to_yaml(value)))) == value
