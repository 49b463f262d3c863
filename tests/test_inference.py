"""The fast tile engine: its exact weight rewrites, and equality with the Keras model it replaces."""

from __future__ import annotations

import numpy as np
import pytest

from exllsm_neuronseg.errors import GeometryError
from exllsm_neuronseg.inference import Predictor, TileEngine, fuse_upsampling, stack_last_axis, stack_pointwise
from exllsm_neuronseg.unet import PREFERRED_TILE_SHAPE, build_unet, default_tile_shape, output_size, read_model_weights

tf = pytest.importorskip("tensorflow")


def conv(x, k):
    return tf.nn.conv3d(x, k, [1, 1, 1, 1, 1], "VALID").numpy()


def test_transposed_conv_fused_into_the_next_conv_is_exact():
    rng = np.random.default_rng(0)
    ci, cm, co, n = 3, 5, 4, 6
    wt, bt = rng.normal(size=(2, 2, 2, cm, ci)).astype(np.float32), rng.normal(size=cm).astype(np.float32)
    wc, bc = rng.normal(size=(3, 3, 3, cm, co)).astype(np.float32), rng.normal(size=co).astype(np.float32)
    x = rng.normal(size=(1, n, n + 1, n + 2, ci)).astype(np.float32)
    up = tf.nn.conv3d_transpose(x, wt, [1, 2 * n, 2 * n + 2, 2 * n + 4, cm], [1, 2, 2, 2, 1], "VALID") + bt
    expected = conv(up, wc) + bc
    fk, fb = fuse_upsampling((wt, bt), (wc, bc))
    y = conv(x, fk)  # (1, n-1, n, n+1, 8*co), channels (p0, p1, p2, co)
    a, b, c = y.shape[1:4]
    y = y.reshape(1, a, b, c, 2, 2, 2, co).transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(1, 2 * a, 2 * b, 2 * c, co) + fb
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)


def test_stacked_kernels_compute_the_same_convolution():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 7, 6, 10, 3)).astype(np.float32)
    k = rng.normal(size=(3, 3, 3, 3, 4)).astype(np.float32)
    expected = conv(x, k)  # last axis 10 -> 8
    y = conv(x.reshape(1, 7, 6, 5, 6), stack_last_axis(k)).reshape(expected.shape)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    k1 = rng.normal(size=(1, 1, 1, 3, 2)).astype(np.float32)
    y1 = conv(x.reshape(1, 7, 6, 5, 6), stack_pointwise(k1)).reshape(1, 7, 6, 10, 2)
    np.testing.assert_allclose(y1, conv(x, k1), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def weights(model_path):
    return read_model_weights(model_path)


def engine_for(weights, shape, **options) -> TileEngine:
    """An engine for ``shape`` (array order); its output shape from the size arithmetic."""
    return TileEngine(weights, shape, tuple(output_size(s) for s in shape), **options)


@pytest.mark.parametrize("axes", ["xyz", "zyx"])
def test_engine_equals_the_keras_model_on_a_non_cubic_tile(weights, axes):
    """Logits, probability and argmax of the rewritten graph match the Keras model; small slabs and
    an uneven last slab exercise the slab bookkeeping."""
    shape = (116, 100, 132)
    x = np.random.default_rng(2).uniform(0, 1.5, size=shape).astype(np.float32)
    x[40:80, 30:70, 50:90] += 2.0  # something bright, so both classes occur
    model = build_unet(shape, weights.config)
    weights.apply_to(model, axes)
    expected = model(x[None, ..., None], training=False).numpy()[0]
    engine = engine_for(weights, shape, axes=axes, slab_rows=6)
    logits = engine.predict_logits(x)
    assert logits.shape == (28, 12, 44, 2)
    np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=0)
    probability = engine.predict(x)
    np.testing.assert_allclose(probability, tf.nn.softmax(expected).numpy()[..., 1], atol=1e-5)
    binary = engine_for(weights, shape, axes=axes, binary=True, slab_rows=6).predict(x)
    assert binary.dtype == np.uint8
    decided = np.abs(expected[..., 1] - expected[..., 0]) > 1e-3
    np.testing.assert_array_equal(binary[decided], expected.argmax(-1)[decided])


def test_engine_scales_raw_input_and_ignores_slab_size(weights):
    shape = (108, 108, 108)
    raw = np.random.default_rng(3).integers(0, 3000, size=shape).astype(np.uint16)
    scale = 0.0007
    a = engine_for(weights, shape, slab_rows=4).predict(raw, scale)
    b = engine_for(weights, shape, slab_rows=32).predict(raw.astype(np.float32) * np.float32(scale))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_predictor_refuses_bad_shapes(model_path):
    with pytest.raises(GeometryError, match="edge 110 is not allowed"):
        Predictor(model_path, (110, 108, 108))
    with pytest.raises(GeometryError, match="even number"):
        Predictor(model_path, (108, 108, 108), slab_rows=5)
    with pytest.raises(GeometryError, match="built for"):
        Predictor(model_path, (108, 108, 108)).predict(np.zeros((100, 108, 108), np.float32))


@pytest.mark.parametrize(
    "image, expected",
    [
        ((10325, 6150, 2560), PREFERRED_TILE_SHAPE),
        ((512, 512, 512), (348, 348, 220)),
        ((150, 140, 130), (244, 236, 220)),
        ((64, 64, 64), (156, 156, 156)),
    ],
)
def test_default_tile_shape(image, expected):
    assert default_tile_shape(image) == expected
    for edge, extent, preferred in zip(expected, image, PREFERRED_TILE_SHAPE):
        assert output_size(edge) is not None and edge <= preferred


def test_tensorflow_loads_without_keras_and_keras_still_imports_afterwards():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from exllsm_neuronseg.inference import import_tensorflow\n"
        "tf = import_tensorflow()\n"
        "assert 'keras' not in sys.modules and 'sklearn' not in sys.modules, 'keras was imported'\n"
        "assert tf.nn.relu(tf.constant([-1.0, 2.0])).numpy().tolist() == [0.0, 2.0]\n"
        "import keras\n"
        "assert keras.optimizers.Adam(1e-3).learning_rate is not None\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
