"""Block-wise segmentation: equality with the original's whole-volume output, partition
invariance (bit-identical), binary masks, post-processing, done markers, scaling from the block."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SCALING

from exllsm_neuronseg.errors import GeometryError, OutputError, ScalingError
from exllsm_neuronseg.geometry import Box
from exllsm_neuronseg.segment import PostProcessing, marker_path, segment_block
from exllsm_neuronseg.volume import create_volume, open_volume

SMALL_TILE = dict(input_shape=(132, 132, 132), output_shape=(44, 44, 44))


def new_output(tmp_path, like, name="out.n5", dtype="float32", chunks=None):
    return create_volume(tmp_path / name, "seg/s0", like.shape, chunks or like.chunks, dtype)


def read_all(vol):
    return vol.read(vol.box)


@pytest.fixture(scope="session")
def whole_default(synthetic_n5, model_path, tmp_path_factory):
    """The synthetic volume segmented as one block with the default tiles: 244 x 236 x 220, two
    along z (the z edge stays at most 220, whose stride 128 is short of the 130 slices)."""
    path, _ = synthetic_n5
    source = open_volume(path, "c1/s0")
    out = new_output(tmp_path_factory.mktemp("whole"), source)
    result = segment_block(source, out, model_path, (0, 0, 0), source.shape, scaling=SCALING)
    return result, read_all(out)


@pytest.fixture(scope="session")
def original_output(synthetic_n5, model_path):
    """The original tool's algorithm (tiles anchored at the volume start, 220^3) on the volume."""
    from reference_original import original_segment

    from exllsm_neuronseg.inference import cached_predictor

    _, image = synthetic_n5
    return original_segment(image, cached_predictor(model_path, (220, 220, 220)), SCALING)


def test_whole_volume_equals_the_original_algorithm(whole_default, original_output):
    result, ours = whole_default
    assert ours.dtype == np.float32 and ours.shape == original_output.shape
    np.testing.assert_allclose(ours, original_output, atol=1e-4, rtol=0)
    assert (ours > 0.5).sum() > 1000  # the tubes are found
    assert result.tiles == 2 and not result.skipped


def test_host_tiles_equal_the_original_and_the_default_tiles(synthetic_n5, whole_default, original_output, model_path, tmp_path):
    """The host's 220^3 tiles give the original's output too: the tile shape changes float rounding only."""
    path, _ = synthetic_n5
    source = open_volume(path, "c1/s0")
    out = new_output(tmp_path, source)
    result = segment_block(source, out, model_path, (0, 0, 0), source.shape, scaling=SCALING, input_shape=(220, 220, 220))
    assert result.tiles == 8
    np.testing.assert_allclose(read_all(out), original_output, atol=1e-4, rtol=0)
    np.testing.assert_allclose(read_all(out), whole_default[1], atol=1e-5, rtol=0)


def test_aligned_blocks_equal_whole(whole_default, synthetic_n5, model_path, tmp_path):
    path, _ = synthetic_n5
    source = open_volume(path, "c1/s0")
    out = new_output(tmp_path, source)
    for start, end in [((0, 0, 0), (64, 140, 130)), ((64, 0, 0), (150, 64, 130)), ((64, 64, 0), (150, 140, 130))]:
        segment_block(source, out, model_path, start, end, scaling=SCALING)
    np.testing.assert_array_equal(read_all(out), whole_default[1])


@pytest.fixture(scope="session")
def small_volume(tmp_path_factory):
    from exllsm_neuronseg.synthetic import SyntheticSpec, write_synthetic_n5

    path = tmp_path_factory.mktemp("small") / "small.n5"
    write_synthetic_n5(str(path), "c1/s0", SyntheticSpec(shape=(100, 90, 80), n_tubes=3, n_puncta=8, seed=5), chunks=(16, 16, 16))
    return open_volume(path, "c1/s0")


@pytest.fixture(scope="session")
def small_whole(small_volume, model_path, tmp_path_factory):
    out = new_output(tmp_path_factory.mktemp("sw"), small_volume)
    segment_block(small_volume, out, model_path, (0, 0, 0), small_volume.shape, scaling=SCALING, **SMALL_TILE)
    return read_all(out)


@pytest.mark.parametrize(
    "cuts",
    [
        ([0, 37, 100], [0, 45, 90], [0, 33, 80]),  # odd starts and sizes
        ([0, 1, 99, 100], [0, 90], [0, 79, 80]),  # one-voxel slivers at both ends
    ],
)
def test_partition_invariance_is_bit_identical(small_volume, small_whole, model_path, tmp_path, cuts):
    out = new_output(tmp_path, small_volume)
    xs, ys, zs = cuts
    for x0, x1 in zip(xs[:-1], xs[1:]):
        for y0, y1 in zip(ys[:-1], ys[1:]):
            for z0, z1 in zip(zs[:-1], zs[1:]):
                segment_block(
                    small_volume, out, model_path, (x0, y0, z0), (x1, y1, z1),
                    scaling=SCALING, allow_unaligned=True, **SMALL_TILE,
                )
    np.testing.assert_array_equal(read_all(out), small_whole)


def test_binary_mask_is_argmax(small_volume, small_whole, model_path, tmp_path):
    out = new_output(tmp_path, small_volume, dtype="uint8")
    segment_block(small_volume, out, model_path, (0, 0, 0), small_volume.shape, scaling=SCALING, binary=True, **SMALL_TILE)
    mask = read_all(out)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask, (small_whole > 0.5).astype(np.uint8))


def test_post_processing_on_the_block(small_volume, small_whole, model_path, tmp_path):
    from exllsm_neuronseg.postprocess import post_process

    out = new_output(tmp_path, small_volume)
    pp = PostProcessing(0.98, 0.2, 0.9, 50)
    segment_block(small_volume, out, model_path, (0, 0, 0), small_volume.shape, scaling=SCALING, post_processing=pp, **SMALL_TILE)
    expected = post_process(small_whole.copy(), 0.98, 0.2, 0.9, 50)
    np.testing.assert_array_equal(read_all(out), expected)
    assert (expected == 0).sum() > (small_whole == 0).sum()  # it removed something


def test_done_marker_skips_and_parameters_invalidate_it(small_volume, model_path, tmp_path):
    out = new_output(tmp_path, small_volume)
    box = ((0, 0, 0), (48, 48, 48))
    first = segment_block(small_volume, out, model_path, *box, scaling=SCALING, **SMALL_TILE)
    assert not first.skipped and marker_path(out, Box(*box)).is_file()
    again = segment_block(small_volume, out, model_path, *box, scaling=SCALING, **SMALL_TILE)
    assert again.skipped
    changed = segment_block(small_volume, out, model_path, *box, scaling=SCALING * 1.1, **SMALL_TILE)
    assert not changed.skipped
    forced = segment_block(small_volume, out, model_path, *box, scaling=SCALING * 1.1, skip_done=False, **SMALL_TILE)
    assert not forced.skipped


def test_interrupted_block_is_redone(small_volume, model_path, tmp_path, monkeypatch):
    """A block that dies while writing has no marker, so the next run does it again."""
    from exllsm_neuronseg import segment as seg

    out = new_output(tmp_path, small_volume)
    box = ((0, 0, 0), (48, 48, 48))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(seg.Volume, "write_zyx", killed)
    with pytest.raises(KeyboardInterrupt):
        segment_block(small_volume, out, model_path, *box, scaling=SCALING, **SMALL_TILE)
    monkeypatch.undo()
    assert not marker_path(out, Box(*box)).exists()
    assert not segment_block(small_volume, out, model_path, *box, scaling=SCALING, **SMALL_TILE).skipped


def test_block_scaling_without_s(small_volume, model_path, tmp_path):
    out = new_output(tmp_path, small_volume)
    warnings = []
    result = segment_block(small_volume, out, model_path, (0, 0, 0), (48, 48, 48), warn=warnings.append, **SMALL_TILE)
    assert any("seams" in w for w in warnings)
    assert 1e-4 < result.scaling < 1e-2


def test_featureless_block_is_an_error_not_nan(model_path, tmp_path):
    dark = create_volume(tmp_path / "dark.n5", "s0", (64, 64, 64), (32, 32, 32), "uint16")
    out = new_output(tmp_path, dark)
    with pytest.raises(ScalingError):
        segment_block(dark, out, model_path, (0, 0, 0), (64, 64, 64), **SMALL_TILE)
    assert read_all(out).sum() == 0 and not (out.path / ".exllsm-done").exists()


def test_unaligned_blocks_are_refused(small_volume, model_path, tmp_path):
    out = new_output(tmp_path, small_volume)
    with pytest.raises(GeometryError, match="not aligned"):
        segment_block(small_volume, out, model_path, (8, 0, 0), (48, 48, 48), scaling=SCALING, **SMALL_TILE)


def test_unwritable_output_is_refused(small_volume, model_path, tmp_path, monkeypatch):
    out = new_output(tmp_path, small_volume)
    monkeypatch.setattr("exllsm_neuronseg.volume.os.access", lambda *a: False)
    with pytest.raises(OutputError, match="not writable"):
        segment_block(small_volume, out, model_path, (0, 0, 0), (48, 48, 48), scaling=SCALING, **SMALL_TILE)


def test_one_io_thread_does_not_deadlock(small_volume, small_whole, model_path, tmp_path):
    out = new_output(tmp_path, small_volume)
    segment_block(small_volume, out, model_path, (0, 0, 0), (64, 64, 64), scaling=SCALING, io_threads=1, **SMALL_TILE)
    np.testing.assert_array_equal(read_all(out)[:64, :64, :64], small_whole[:64, :64, :64])


def test_batches_give_the_same_voxels(small_volume, small_whole, model_path, tmp_path):
    out = new_output(tmp_path, small_volume)
    segment_block(small_volume, out, model_path, (0, 0, 0), small_volume.shape, scaling=SCALING, batch_size=4, **SMALL_TILE)
    np.testing.assert_allclose(read_all(out), small_whole, atol=1e-6, rtol=0)
