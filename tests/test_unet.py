"""The U-Net: golden values of the published model (spec 6), size arithmetic, weights files."""

from __future__ import annotations

import numpy as np
import pytest

from exllsm_neuronseg.errors import GeometryError, ModelError
from exllsm_neuronseg.unet import (
    UNetConfig,
    check_tile_shapes,
    conv_flops,
    output_size,
    read_model_weights,
    valid_input_sizes,
)


def golden_input() -> np.ndarray:
    i, j, k = np.meshgrid(*(np.arange(220.0),) * 3, indexing="ij")
    bg = 0.05 + 0.03 * np.sin(0.21 * i) * np.cos(0.13 * j) * np.sin(0.17 * k + 1.0)
    x = (
        bg
        + 1.5 * np.exp(-((j - 110) ** 2 + (k - 110) ** 2) / (2 * 3**2))
        + 1.0 * np.exp(-(((i - j) ** 2) / 2 + (k - 80) ** 2) / (2 * 2**2))
    )
    return x.astype(np.float32)


@pytest.fixture(scope="session")
def golden_logits(model_path):
    from exllsm_neuronseg.unet import load_unet

    model, _ = load_unet(model_path, (220, 220, 220))
    return model(golden_input()[None, ..., None], training=False).numpy()[0]


@pytest.fixture(scope="session")
def golden_probability(model_path):
    from exllsm_neuronseg.inference import cached_predictor

    return cached_predictor(model_path, (220, 220, 220)).predict(golden_input())


def test_golden_probability_summary(golden_probability):
    p = golden_probability
    assert p.shape == (132, 132, 132) and p.dtype == np.float32
    assert p.mean() == pytest.approx(0.038457, abs=1e-4)
    assert p.max() == pytest.approx(0.999941, abs=1e-4)
    assert p.min() == pytest.approx(0.000485, abs=1e-4)
    assert int((p > 0.5).sum()) == 66682


@pytest.mark.parametrize(
    "voxel, expected",
    [
        ((0, 0, 0), 0.003778),
        ((66, 66, 66), 0.999936),
        ((66, 66, 88), 0.002793),
        ((10, 66, 66), 0.999936),
        ((100, 120, 36), 0.045145),
        ((131, 131, 131), 0.003394),
    ],
)
def test_golden_probability_voxels(golden_probability, voxel, expected):
    assert golden_probability[voxel] == pytest.approx(expected, abs=1e-4)


def test_golden_logits(golden_logits):
    z = golden_logits
    assert z[..., 0].mean() == pytest.approx(-12.427402, abs=1e-4)
    assert z[..., 1].mean() == pytest.approx(-17.299345, abs=1e-4)
    np.testing.assert_allclose(z[0, 0, 0], [-13.7800, -19.3547], atol=1e-4)
    np.testing.assert_allclose(z[66, 66, 66], [-13.4704, -3.8178], atol=1e-4)
    np.testing.assert_allclose(z[100, 120, 36], [-7.6883, -10.7400], atol=1e-4)
    assert int((z.argmax(-1) == 1).sum()) == 66682


def test_binary_predictor_is_argmax(model_path, golden_logits):
    from exllsm_neuronseg.inference import cached_predictor

    mask = cached_predictor(model_path, (220, 220, 220), binary=True).predict(golden_input())
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, golden_logits.argmax(-1).astype(np.uint8))


def test_any_valid_tile_size_runs_the_same_weights(model_path, golden_probability):
    """Rebuilt at 228 (output 140), the centre agrees with the 220 run shifted by 4 voxels."""
    from exllsm_neuronseg.inference import cached_predictor

    x = np.pad(golden_input(), 4, mode="reflect")
    p = cached_predictor(model_path, (228, 228, 228)).predict(x)
    assert p.shape == (140, 140, 140)
    np.testing.assert_allclose(p[4:-4, 4:-4, 4:-4], golden_probability, atol=1e-5)


def test_published_model_facts(model_path):
    w = read_model_weights(model_path)
    assert w.config == UNetConfig(n_blocks=2, initial_filters=4, n_classes=2)
    assert w.input_shape == (220, 220, 220)
    assert sum(k.size + b.size for pairs in w.layers.values() for k, b in pairs) == 298418
    np.testing.assert_allclose(w.layers["output_block"][-1][1], [-0.05493, 0.05492], atol=1e-5)


def test_valid_sizes():
    assert output_size(220) == 132
    assert [output_size(s) for s in (92, 100, 108, 212, 228)] == [4, 12, 20, 124, 140]
    assert valid_input_sizes(2, 120) == [92, 100, 108, 116]
    assert output_size(221) is None and output_size(84) is None
    assert valid_input_sizes(1, 60)[0] == 44 and output_size(44, 1) == 4


def test_conv_flops_of_a_220_tile():
    assert conv_flops((220, 220, 220), UNetConfig()) == pytest.approx(2 * 51.8e9, rel=1e-3)


@pytest.mark.parametrize(
    "inp, out, message",
    [
        ((221, 220, 220), None, "edge 221 is not allowed"),
        ((84, 220, 220), None, "s >= 92"),
        ((220, 220), None, "3 values"),
        ((220, 220, 220), (130, 132, 132), "gives 132,132,132"),
    ],
)
def test_bad_tile_shapes_say_what_is_valid(inp, out, message):
    with pytest.raises(GeometryError, match=message):
        check_tile_shapes(inp, out)


def test_bad_model_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        read_model_weights(tmp_path / "missing.h5")
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(ModelError, match="not a readable HDF5"):
        read_model_weights(corrupt)
    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5.attrs["model_config"] = '{"class_name": "Model", "config": {"layers": [{"class_name": "Dense", "config": {}}]}}'
    with pytest.raises(ModelError, match="not this U-Net"):
        read_model_weights(other)


def test_save_and_reload_roundtrip(tmp_path, model_path):
    """A model saved by save_unet loads back with the same weights and hyper-parameters."""
    from exllsm_neuronseg.unet import load_unet, save_unet

    model, weights = load_unet(model_path, (92, 92, 92))
    path = tmp_path / "copy.h5"
    save_unet(model, path, weights.config)
    again = read_model_weights(path)
    assert again.config == weights.config
    for name, pairs in weights.layers.items():
        for (k1, b1), (k2, b2) in zip(pairs, again.layers[name]):
            np.testing.assert_array_equal(k1, k2)
            np.testing.assert_array_equal(b1, b2)


def test_zyx_predictor_is_the_same_function(model_path, golden_probability):
    """Mirrored kernels on z,y,x arrays give the x,y,z model's output, transposed."""
    from exllsm_neuronseg.inference import cached_predictor

    p = cached_predictor(model_path, (220, 220, 220), axes="zyx").predict(golden_input().transpose(2, 1, 0))
    np.testing.assert_allclose(p.transpose(2, 1, 0), golden_probability, atol=1e-5)
