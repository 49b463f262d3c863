"""Whole-volume scale (issue 10): constant tiles answered without the model, mask-restricted
segmentation, several blocks per process, bf16/fp16 precision, and the one predictor that owns the
model.

Most tests share one small sparse volume, 384 x 64 x 64 uint16 in 32^3 chunks, cut along x into
three parts: x < 128 missing chunks (zeros), 128 <= x < 224 synthetic neurons, x >= 224 the constant
700.  With 156^3 tiles (output 68, stride 64, context 44) it has six tiles along x: tile 0's input
window (reflected at the image edge) is all zero, tile 5's all 700, and tiles 1-4 need the model.

``segment_block`` keeps one predictor per process (``inference.cached_predictor``), whose cache of
constant answers outlives an output; tests that stand for a new process empty that cache first.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, SCALING, run_script

from exllsm_neuronseg import inference
from exllsm_neuronseg.errors import GeometryError, ModelError, PrecisionError, VolumeError
from exllsm_neuronseg.geometry import Box, block_line, parse_block_line, read_block_plan, select_indices
from exllsm_neuronseg.segment import (
    CONSTANT_DIR,
    DONE_DIR,
    mask_box,
    marker_path,
    run_fingerprint,
    segment_block,
    segment_blocks,
)
from exllsm_neuronseg.volume import create_volume, open_volume, open_volume_spec

SHAPE = (384, 64, 64)  # x,y,z
CHUNKS = (32, 32, 32)
CONST = 700
TILE = (156, 156, 156)  # output 68, stride 64
TILE_ARG = "156,156,156"
N_TILES, N_CONSTANT = 6, 2
OLD_SETTINGS = {"model_sha256", "scaling", "input", "tile", "binary", "post_processing"}  # markers before issue 10


def read_all(vol):
    return vol.read(vol.box)


def new_output(tmp_path, name="out.n5", dtype="float32"):
    return create_volume(tmp_path / name, "seg/s0", SHAPE, CHUNKS, dtype)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def owned_slices(k: int) -> tuple[slice, slice, slice]:
    """The x,y,z slices of the image that tile k (along x) writes."""
    return (slice(64 * k, min(64 * k + 64, SHAPE[0])), slice(None), slice(None))


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def forget_predictors() -> None:
    """Forget this process's predictors (and their constant answers), as a new process starts."""
    inference._PREDICTORS.clear()


# --------------------------------------------------------------------------------------------
# Shared volumes and runs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    from exllsm_neuronseg.synthetic import SyntheticSpec, synthetic_volume

    path = tmp_path_factory.mktemp("sparse") / "sparse.n5"
    vol = create_volume(path, "c1/s0", SHAPE, CHUNKS, "uint16")
    neurons, _ = synthetic_volume(SyntheticSpec(shape=(96, 64, 64), n_tubes=4, n_puncta=6, seed=11))
    data = np.full((256, 64, 64), CONST, np.uint16)  # x = 128..384; x < 128 stays missing chunks
    data[:96] = neurons
    vol.write_chunked_zyx(Box((128, 0, 0), SHAPE), data.transpose(2, 1, 0))
    chunk_files = [p for p in vol.path.rglob("*") if p.is_file() and p.name != "attributes.json"]
    assert len(chunk_files) == 8 * 2 * 2  # x chunks 4..11 only: the zero space is missing chunks
    return vol


@pytest.fixture(scope="module")
def full_run(sparse, model_path, tmp_path_factory):
    """The sparse volume as one block with the model on every tile (skipping off)."""
    out = new_output(tmp_path_factory.mktemp("full"))
    result = segment_block(sparse, out, model_path, (0, 0, 0), SHAPE, scaling=SCALING, input_shape=TILE, skip_constant=False)
    return result, read_all(out)


@pytest.fixture(scope="module")
def skip_run(sparse, model_path, tmp_path_factory):
    """The sparse volume as one block with constant tiles skipped (the default)."""
    forget_predictors()  # so that this output gets the records of its constant answers
    out = new_output(tmp_path_factory.mktemp("skip"))
    result = segment_block(sparse, out, model_path, (0, 0, 0), SHAPE, scaling=SCALING, input_shape=TILE)
    assert len(list((out.path / CONSTANT_DIR).glob("*.npy"))) == 2
    return result, read_all(out), out


# --------------------------------------------------------------------------------------------
# 1. Constant tiles
# --------------------------------------------------------------------------------------------

CONSTANT_CASES = [
    (np.uint16, 0, SCALING),
    (np.uint16, CONST, SCALING),
    (np.uint16, 65535, SCALING),
    (np.float32, 0.0, 1.0),
    (np.float32, 0.8, 1.0),
    (np.float32, -2.5, 1.0),
    (np.float32, 1500.0, SCALING),
]
TILE_SHAPES = [(108, 108, 108), (124, 108, 116)]  # x,y,z; the second is not cubic


@pytest.fixture(scope="module")
def predictors(model_path):
    from exllsm_neuronseg.inference import Predictor

    cache = {}

    def get(shape, binary):
        if (shape, binary) not in cache:
            cache[shape, binary] = Predictor(model_path, shape, binary=binary, axes="zyx")
        return cache[shape, binary]

    return get


@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, value, scale", CONSTANT_CASES, ids=lambda v: str(getattr(v, "__name__", v)))
def test_constant_output_equals_the_model_on_a_constant_tile(predictors, shape, dtype, value, scale):
    probability, binary = predictors(shape, False), predictors(shape, True)
    tile = np.full(shape[::-1], value, dtype)  # z,y,x array order
    expected = probability.predict(tile, scale)
    got = probability.constant_output(value, dtype, scale)
    assert got.shape == expected.shape == probability.output_shape[::-1] and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    expected_mask = binary.predict(tile, scale)
    got_mask = binary.constant_output(value, dtype, scale)
    assert got_mask.dtype == np.uint8
    np.testing.assert_array_equal(got_mask, expected_mask)


def test_constant_answers_do_not_build_the_tile_engine(model_path, tmp_path):
    from exllsm_neuronseg.inference import Predictor

    p = Predictor(model_path, (108, 108, 108), axes="zyx")
    assert not p.engine_loaded
    first = p.constant_output(0, np.uint16, SCALING, tmp_path / "records")
    assert not p.engine_loaded  # only the small engine for the constant ran
    assert p.constant_output(0, np.uint16, SCALING) is not None and not p.engine_loaded
    records = list((tmp_path / "records").glob("*.npy"))
    assert len(records) == 1
    np.testing.assert_array_equal(np.tile(np.load(records[0]), (3, 3, 3))[:20, :20, :20], first)
    p.predict(np.zeros((108, 108, 108), np.uint16), SCALING)
    assert p.engine_loaded


def test_skipping_constant_tiles_equals_the_full_computation(full_run, skip_run):
    full_result, full = full_run
    skip_result, skipped, _ = skip_run
    assert full_result.model_tiles == N_TILES and full_result.constant_tiles == 0
    assert skip_result.constant_tiles == N_CONSTANT and skip_result.model_tiles == N_TILES - N_CONSTANT
    assert skip_result.tiles == N_TILES and skip_result.background_tiles == 0
    assert "2 constant" in skip_result.summary()
    assert np.abs(skipped - full).max() <= 1e-6
    np.testing.assert_array_equal(skipped[64:320], full[64:320])  # tiles 1-4 ran the model in both
    assert (full > 0.5).sum() > 500  # the neurons are found


def test_skipping_constant_tiles_gives_identical_binary_masks(sparse, model_path, tmp_path):
    masks, results = [], []
    for skip in (True, False):
        out = new_output(tmp_path, f"bin-{skip}.n5", "uint8")
        results.append(
            segment_block(
                sparse, out, model_path, (0, 0, 0), SHAPE, scaling=SCALING, input_shape=TILE, binary=True, skip_constant=skip
            )
        )
        masks.append(read_all(out))
    assert results[0].constant_tiles == N_CONSTANT and results[1].constant_tiles == 0
    assert masks[0].dtype == np.uint8 and masks[0].sum() > 500
    np.testing.assert_array_equal(masks[0], masks[1])


def test_constant_records_are_written_beside_the_output(skip_run, model_path):
    from exllsm_neuronseg.inference import Predictor

    _, _, out = skip_run
    records = sorted((out.path / CONSTANT_DIR).glob("*.npy"))
    assert len(records) == 2  # one per constant value (0 and 700) at this scaling
    arrays = [np.load(r) for r in records]
    assert all(a.shape == (8, 8, 8) and a.dtype == np.float32 for a in arrays)
    p = Predictor(model_path, TILE, axes="zyx")
    expected = [p.constant_period(v, np.uint16, SCALING) for v in (0, CONST)]
    assert sorted(a.tobytes() for a in arrays) == sorted(e.tobytes() for e in expected)
    assert not list((out.path / CONSTANT_DIR).glob(".*partial"))


def test_partition_invariance_stays_bit_identical_with_skipping(sparse, skip_run, model_path, tmp_path):
    """Eight chunk-aligned blocks, each as in a new process (the later ones load the records the
    first ones wrote), give exactly the whole-volume block's output."""
    _, whole, _ = skip_run
    out = new_output(tmp_path)
    constant = 0
    for x0, x1 in [(0, 64), (64, 192), (192, 320), (320, 384)]:
        for y0, y1 in [(0, 32), (32, 64)]:
            forget_predictors()
            r = segment_block(sparse, out, model_path, (x0, y0, 0), (x1, y1, 64), scaling=SCALING, input_shape=TILE)
            constant += r.constant_tiles
    assert constant == 4  # tiles 0 and 5, in both y halves
    np.testing.assert_array_equal(read_all(out), whole)


NO_TF_SCRIPT = """
import json, sys
from exllsm_neuronseg.segment import segment_block
from exllsm_neuronseg.volume import open_volume
source = open_volume({source!r}, "c1/s0")
out = open_volume({output!r}, "seg/s0", mode="r+")
r = segment_block(source, out, {model!r}, {start!r}, {end!r}, scaling={scaling!r}, input_shape={tile!r}, skip_done=False)
print(json.dumps({{"tensorflow": "tensorflow" in sys.modules, "constant": r.constant_tiles, "model": r.model_tiles}}))
"""

ALL_CONSTANT_BLOCKS = {
    "zeros, missing chunks": ((0, 0, 0), (64, 64, 64)),  # tile 0
    "700, stored chunks": ((320, 0, 0), (384, 64, 64)),  # tile 5
}


def _second_process_on_a_constant_block(sparse, model_path, tmp_path, case):
    start, end = ALL_CONSTANT_BLOCKS[case]
    forget_predictors()
    out = new_output(tmp_path)
    first = segment_block(sparse, out, model_path, start, end, scaling=SCALING, input_shape=TILE)
    assert first.constant_tiles == 1 and first.model_tiles == 0
    assert len(list((out.path / CONSTANT_DIR).glob("*.npy"))) == 1
    expected = read_all(out)
    out.write_zyx(start, np.full(Box(start, end).shape[::-1], 0.25, np.float32))  # the second process must write it
    code = NO_TF_SCRIPT.format(
        source=str(sparse.container), output=str(out.container), model=str(model_path),
        start=start, end=end, scaling=SCALING, tile=TILE,
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(read_all(out), expected)
    assert not (read_all(out) == 0.25).any()
    assert (report["constant"], report["model"]) == (1, 0)
    return report


@pytest.mark.parametrize("case", list(ALL_CONSTANT_BLOCKS))
def test_a_constant_block_with_a_recorded_answer_needs_no_tensorflow(sparse, model_path, tmp_path, case):
    """A second process segmenting an all-constant block (missing chunks, or stored chunks of one
    value), with the answer recorded beside the output, writes the same output and never imports
    TensorFlow."""
    report = _second_process_on_a_constant_block(sparse, model_path, tmp_path, case)
    assert report["tensorflow"] is False


IMPORT_RACE = """
import sys, threading, time
import numpy as np
from exllsm_neuronseg.inference import Predictor, import_tensorflow
threading.Thread(target=import_tensorflow).start()  # another thread starts importing TensorFlow
while "tensorflow" not in sys.modules:
    time.sleep(0.0005)
p = Predictor({model!r}, {tile!r}, axes="zyx")
answer = p.constant_output(0, np.uint16, {scaling!r})  # needs TensorFlow now: waits for the whole module
print("ok", answer.shape)
"""


def test_tensorflow_asked_for_while_another_thread_imports_it(model_path):
    """import_tensorflow in a second thread, while the first is still importing, waits for the whole
    module (never a half-initialised one); and nothing of TensorFlow's start-up chatter reaches stderr."""
    code = IMPORT_RACE.format(model=str(model_path), tile=TILE, scaling=SCALING)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok (68, 68, 68)"
    assert "oneDNN" not in proc.stderr and "absl" not in proc.stderr, proc.stderr


def test_every_output_gets_the_records_of_its_constant_answers(sparse, model_path, tmp_path):
    forget_predictors()
    for name in ("a.n5", "b.n5"):
        out = new_output(tmp_path, name)
        result = segment_block(sparse, out, model_path, (0, 0, 0), (64, 64, 64), scaling=SCALING, input_shape=TILE)
        assert result.constant_tiles == 1
        assert len(list((out.path / CONSTANT_DIR).glob("*.npy"))) == 1, name


def _saved(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


RECORD_CORRUPTIONS = {
    "empty file": lambda good: b"",
    "garbage": lambda good: b"this is not a numpy file at all" * 10,
    "truncated": lambda good: good[: len(good) // 2],
    "header only": lambda good: good[:128],
    "wrong shape": lambda good: _saved(np.full((4, 4, 4), 0.5, np.float32)),
    "flat": lambda good: _saved(np.full(512, 0.5, np.float32)),
    "wrong dtype": lambda good: _saved(np.full((8, 8, 8), 0.5, np.float64)),
    "binary dtype": lambda good: _saved(np.ones((8, 8, 8), np.uint8)),
    "object array": lambda good: _saved(np.array([[1, 2], "x"], dtype=object)),
}


@pytest.fixture(scope="module")
def record_truth(model_path, tmp_path_factory):
    from exllsm_neuronseg.inference import Predictor

    store = tmp_path_factory.mktemp("truth")
    truth = Predictor(model_path, (108, 108, 108), axes="zyx").constant_period(CONST, np.uint16, SCALING, store)
    (record,) = store.glob("*.npy")
    return truth, record.name, record.read_bytes()


@pytest.mark.parametrize("case", list(RECORD_CORRUPTIONS))
def test_bad_constant_records_are_recomputed_not_trusted(record_truth, model_path, tmp_path, case):
    from exllsm_neuronseg.inference import Predictor

    truth, name, good = record_truth
    store = tmp_path / "records"
    store.mkdir()
    record = store / name
    record.write_bytes(RECORD_CORRUPTIONS[case](good))
    got = Predictor(model_path, (108, 108, 108), axes="zyx").constant_period(CONST, np.uint16, SCALING, store)
    assert got.shape == (8, 8, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, truth, atol=1e-7, rtol=0)
    kept = np.load(record)  # the record is written again, right this time
    assert kept.shape == (8, 8, 8) and kept.dtype == np.float32
    np.testing.assert_allclose(kept, truth, atol=1e-7, rtol=0)
    assert sorted(p.name for p in store.iterdir()) == [name]  # no temporary left


def test_a_bad_record_in_the_output_is_recomputed_by_segmentation(sparse, skip_run, model_path, tmp_path):
    _, whole, _ = skip_run
    forget_predictors()
    out = new_output(tmp_path)
    box = ((0, 0, 0), (64, 64, 64))  # tile 0 only: all zero
    segment_block(sparse, out, model_path, *box, scaling=SCALING, input_shape=TILE)
    (record,) = (out.path / CONSTANT_DIR).glob("*.npy")
    np.save(record, np.full((4, 4, 4), 0.5, np.float32))  # a wrong-shape record
    forget_predictors()  # as a new process
    result = segment_block(sparse, out, model_path, *box, scaling=SCALING, input_shape=TILE, skip_done=False)
    assert result.constant_tiles == 1 and not result.skipped
    np.testing.assert_array_equal(read_all(out)[:64], whole[:64])
    assert np.load(record).shape == (8, 8, 8)


# --------------------------------------------------------------------------------------------
# 2. Masks
# --------------------------------------------------------------------------------------------


def reference_mask_box(box: Box, mask_shape, image_shape) -> Box:
    """Mask voxels m whose stretched extent [m*n/k, (m+1)*n/k) overlaps image box [s, e), per axis."""
    start, end = [], []
    for s, e, k, n in zip(box.start, box.end, mask_shape, image_shape):
        hits = [m for m in range(k) if Fraction(m * n, k) < e and Fraction((m + 1) * n, k) > s]
        start.append(hits[0])
        end.append(hits[-1] + 1)
    return Box(tuple(start), tuple(end))


@pytest.mark.parametrize(
    "box, mask_shape, image_shape, expected",
    [
        (((25, 0, 99), (35, 100, 100)), (10, 10, 10), (100, 100, 100), ((2, 0, 9), (4, 10, 10))),  # mask smaller
        (((10, 0, 49), (20, 1, 50)), (100, 100, 100), (50, 50, 50), ((20, 0, 98), (40, 2, 100))),  # mask larger
        (((10, 0, 33), (20, 1, 34)), (30, 7, 30), (100, 100, 100), ((3, 0, 9), (6, 1, 11))),  # odd ratios
        (((0, 0, 0), (100, 100, 100)), (30, 7, 1), (100, 100, 100), ((0, 0, 0), (30, 7, 1))),  # whole image
        (((5, 5, 5), (6, 6, 6)), (7, 7, 7), (7, 7, 7), ((5, 5, 5), (6, 6, 6))),  # same shape
    ],
)
def test_mask_box_examples(box, mask_shape, image_shape, expected):
    assert mask_box(Box(*box), mask_shape, image_shape) == Box(*expected)
    assert reference_mask_box(Box(*box), mask_shape, image_shape) == Box(*expected)


def test_mask_box_covers_exactly_the_overlapping_mask_voxels():
    rng = np.random.default_rng(4)
    for _ in range(3000):
        image = tuple(int(v) for v in rng.integers(1, 60, 3))
        mask = tuple(int(v) for v in rng.integers(1, 130, 3))
        start = tuple(int(rng.integers(0, n)) for n in image)
        end = tuple(int(rng.integers(s + 1, n + 1)) for s, n in zip(start, image))
        box = Box(start, end)
        assert mask_box(box, mask, image) == reference_mask_box(box, mask, image), (box, mask, image)


def write_mask(path: Path, shape, tissue) -> object:
    mask = create_volume(path, "mask/s0", shape, shape, "uint8")
    data = np.zeros(shape, np.uint8)
    data[tissue] = 1
    mask.write_chunked_zyx(mask.box, data.transpose(2, 1, 0))
    return open_volume(path, "mask/s0")


def tissue_tiles(mask) -> list[int]:
    data = read_all(mask)
    tiles = []
    for k in range(N_TILES):
        owned = Box((64 * k, 0, 0), (min(64 * k + 64, SHAPE[0]), 64, 64))
        if data[reference_mask_box(owned, mask.shape, SHAPE).slices()].any():
            tiles.append(k)
    return tiles


MASKS = {
    # 7 x 3 x 3, tissue in mask x 2..3 = image x 109.7..219.4: tiles 1, 2 and 3
    "smaller, odd ratios": ((7, 3, 3), (slice(2, 4), slice(None), slice(None)), [1, 2, 3]),
    # 768 x 16 x 5, one tissue voxel at mask (300, 7, 2) = image x 150..150.5: tile 2 only
    "larger in x, smaller in y and z": ((768, 16, 5), (slice(300, 301), slice(7, 8), slice(2, 3)), [2]),
}


@pytest.mark.parametrize("case", sorted(MASKS))
def test_tiles_outside_the_mask_are_background(sparse, skip_run, model_path, tmp_path, case):
    shape, tissue, expected_tiles = MASKS[case]
    mask = write_mask(tmp_path / "mask.n5", shape, tissue)
    assert tissue_tiles(mask) == expected_tiles
    _, unmasked, _ = skip_run
    out = new_output(tmp_path)
    result = segment_block(sparse, out, model_path, (0, 0, 0), SHAPE, scaling=SCALING, input_shape=TILE, mask=mask)
    got = read_all(out)
    assert result.background_tiles == N_TILES - len(expected_tiles)
    assert result.model_tiles + result.constant_tiles + result.background_tiles == N_TILES
    assert f"{result.background_tiles} outside the mask" in result.summary()
    for k in range(N_TILES):
        if k in expected_tiles:
            np.testing.assert_array_equal(got[owned_slices(k)], unmasked[owned_slices(k)])
        else:
            assert (got[owned_slices(k)] == 0).all(), k
    assert got.max() > 0.5


def test_a_mask_changes_the_done_marker(sparse, skip_run, model_path, tmp_path):
    _, unmasked, _ = skip_run
    mask = write_mask(tmp_path / "mask.n5", *MASKS["smaller, odd ratios"][:2])
    other = write_mask(tmp_path / "other.n5", *MASKS["larger in x, smaller in y and z"][:2])
    out = new_output(tmp_path)
    run = lambda m: segment_block(  # noqa: E731
        sparse, out, model_path, (0, 0, 0), SHAPE, scaling=SCALING, input_shape=TILE, mask=m
    )
    assert not run(None).skipped
    masked = run(mask)
    assert not masked.skipped and masked.background_tiles == 3  # re-segmented: the marker differs
    marker = json.loads(marker_path(out, Box((0, 0, 0), SHAPE)).read_text())
    assert "mask" in marker["settings"]
    assert (read_all(out)[owned_slices(0)] == 0).all()
    assert run(mask).skipped
    assert run(other).background_tiles == 5  # another mask is another setting
    assert not run(None).skipped
    np.testing.assert_array_equal(read_all(out), unmasked)


@pytest.fixture()
def cli_output(tmp_path):
    """A fresh float32 output for the sparse volume, with its digest before the run."""
    out = new_output(tmp_path, "cli.n5")
    return Path(out.container), out.path, tree_digest(out.path)


def seg_args(source, out, model, *extra) -> list:
    return [
        "-i", source.container, "-id", "c1/s0", "-o", out, "-od", "seg/s0", "-m", model, "-s", SCALING,
        "--model_input_shape", TILE_ARG, "--no-progress", *extra,
    ]


def _bad_mask_specs(tmp_path: Path) -> dict:
    import zarr

    container = tmp_path / "masks.n5"
    write_mask(container, (6, 2, 2), (slice(None),) * 3)
    flat = tmp_path / "flat.zarr"
    zarr.open_group(str(flat), mode="a").zeros("plane", shape=(4, 4), chunks=(4, 4), dtype="uint8")
    return {
        "no colon": (str(container), "not CONTAINER:DATASET"),
        "empty dataset": (f"{container}:", "not CONTAINER:DATASET"),
        "missing dataset": (f"{container}:/mask/s9", "does not exist"),
        "2-D dataset": (f"{flat}:/plane", "2 dimensions"),
        "missing container": (f"{tmp_path}/nowhere.n5:/mask/s0", "does not exist"),
    }


@pytest.mark.parametrize("case", ["no colon", "empty dataset", "missing dataset", "2-D dataset", "missing container"])
def test_bad_mask_spec_is_one_error_line(sparse, model_path, cli_output, tmp_path, case):
    spec, message = _bad_mask_specs(tmp_path)[case]
    container, dataset_path, before = cli_output
    proc = run_script("segment_volume.py", *seg_args(sparse, container, model_path, "--mask", spec))
    line = one_error_line(proc)
    assert message in line, line
    assert tree_digest(dataset_path) == before and not (dataset_path / DONE_DIR).exists()


def test_open_volume_spec_splits_at_the_last_colon(tmp_path):
    write_mask(tmp_path / "m.n5", (6, 2, 2), (slice(None),) * 3)
    vol = open_volume_spec(f"{tmp_path}/m.n5:/mask/s0", "the mask")
    assert vol.shape == (6, 2, 2) and read_all(vol).all()
    with pytest.raises(VolumeError, match="the mask"):
        open_volume_spec("no-colon-here", "the mask")


# --------------------------------------------------------------------------------------------
# 3. Several blocks per process
# --------------------------------------------------------------------------------------------

BLOCKS = [((0, 0, 0), (128, 64, 64)), ((128, 0, 0), (256, 64, 64)), ((256, 0, 0), (384, 64, 64))]


def block_flags(blocks) -> list[str]:
    flags = []
    for s, e in blocks:
        flags += ["--start", ",".join(map(str, s)), "--end", ",".join(map(str, e))]
    return flags


def block_line_prefix(start, end) -> str:
    return f"block {Box(tuple(start), tuple(end))}: "


@pytest.fixture(scope="module")
def one_process_per_block(sparse, skip_run, model_path, tmp_path_factory):
    out = new_output(tmp_path_factory.mktemp("single"))
    for start, end in BLOCKS:
        proc = run_script("segment_volume.py", *seg_args(sparse, out.container, model_path, *block_flags([(start, end)])), check=True)
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(block_line_prefix(start, end) + "2 tiles"), proc.stdout
    return read_all(out)


CLI_WITH_TF_REPORT = """
import runpy, sys
sys.path.insert(0, {bin!r})
sys.argv = [{script!r}, *sys.argv[1:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    status = 0
except SystemExit as exc:
    status = exc.code
print("tensorflow loaded:", "tensorflow" in sys.modules)
sys.exit(status)
"""


def run_cli_reporting_tensorflow(*args) -> subprocess.CompletedProcess:
    code = CLI_WITH_TF_REPORT.format(bin=str(BIN), script=str(BIN / "segment_volume.py"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_repeated_start_end_equals_one_process_per_block(sparse, skip_run, one_process_per_block, model_path, tmp_path):
    out = new_output(tmp_path)
    proc = run_script("segment_volume.py", *seg_args(sparse, out.container, model_path, *block_flags(BLOCKS)), check=True)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(BLOCKS) + 1, proc.stdout
    for line, (start, end), constant in zip(lines, BLOCKS, (1, 0, 1)):
        assert line.startswith(block_line_prefix(start, end) + "2 tiles"), line
        assert ("(1 constant: no model)" in line) == bool(constant), line
    assert lines[-1].startswith("3 blocks: 3 segmented, 0 already done, 6 tiles (2 without the model) in "), lines[-1]
    for start, end in BLOCKS:
        assert marker_path(out, Box(start, end)).is_file()
    got = read_all(out)
    np.testing.assert_array_equal(got, one_process_per_block)
    np.testing.assert_array_equal(got, skip_run[1])  # and the whole volume as one block

    # a re-run finds every block done, and never starts TensorFlow
    again = run_cli_reporting_tensorflow(*seg_args(sparse, out.container, model_path, *block_flags(BLOCKS)))
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.strip().splitlines()
    assert lines[-1] == "tensorflow loaded: False", again.stdout
    assert len(lines) == len(BLOCKS) + 2
    for line, (start, end) in zip(lines, BLOCKS):
        assert line == f"block {Box(start, end)}: already done (marker present), skipped", line
    assert lines[len(BLOCKS)].startswith("3 blocks: 0 segmented, 3 already done, 0 tiles"), lines
    np.testing.assert_array_equal(read_all(out), got)


def test_block_plan_file_and_indices(sparse, skip_run, model_path, tmp_path):
    """plan_blocks.py's plan, three of its four blocks chosen with --block-index."""
    plan = tmp_path / "blocks.txt"
    run_script(
        "plan_blocks.py", "-i", sparse.container, "-id", "c1/s0", "--partition_size", "96,64,64",
        "-o", plan, "--scaling_output", tmp_path / "jobs.txt", check=True,
    )
    boxes = read_block_plan(plan.read_text())
    assert [b.start[0] for b in boxes] == [0, 96, 192, 288] and all(b.end[1:] == (64, 64) for b in boxes)
    out = new_output(tmp_path)
    proc = run_script(
        "segment_volume.py", *seg_args(sparse, out.container, model_path, "--blocks", plan, "--block-index", "0-1,3"),
        check=True,
    )
    lines = proc.stdout.strip().splitlines()
    chosen = [boxes[i] for i in (0, 1, 3)]
    assert len(lines) == 4, proc.stdout
    for line, box in zip(lines, chosen):
        assert line.startswith(f"block {box}: 2 tiles"), line
    assert lines[-1].startswith("3 blocks: 3 segmented, 0 already done, 6 tiles"), lines[-1]
    assert [marker_path(out, b).is_file() for b in boxes] == [True, True, False, True]
    got, whole = read_all(out), skip_run[1]
    for box in chosen:
        np.testing.assert_array_equal(got[box.slices()], whole[box.slices()])
    assert (got[boxes[2].slices()] == 0).all()  # block 2 was not chosen


def test_several_blocks_as_a_library_call_match_and_skip(sparse, skip_run, model_path, tmp_path):
    out = new_output(tmp_path)
    seen = []
    results = segment_blocks(sparse, out, model_path, BLOCKS, scaling=SCALING, input_shape=TILE, on_result=seen.append)
    assert seen == results and [r.tiles for r in results] == [2, 2, 2]
    assert [r.constant_tiles for r in results] == [1, 0, 1]
    np.testing.assert_array_equal(read_all(out), skip_run[1])
    ticks = []
    again = segment_blocks(
        sparse, out, model_path, BLOCKS, scaling=SCALING, input_shape=TILE, progress=lambda d, t: ticks.append((d, t))
    )
    assert all(r.skipped for r in again)
    assert ticks and ticks[-1] == (6, 6)


BAD_BLOCK_ARGS = {
    "start/end counts differ": (["--start", "0,0,0", "--start", "128,0,0", "--end", "128,64,64"], "2 --start and 1 --end"),
    "two --end, no --start": (["--end", "128,64,64", "--end", "256,64,64"], "0 --start and 2 --end"),
    "overlapping blocks": (block_flags([((0, 0, 0), (128, 64, 64)), ((96, 0, 0), (192, 64, 64))]), "overlap"),
    "same block twice": (block_flags([BLOCKS[0], BLOCKS[0]]), "overlap"),
    "second block unaligned": (block_flags([BLOCKS[0], ((128, 0, 0), (200, 64, 64))]), "not aligned"),
    "second block outside the image": (block_flags([BLOCKS[0], ((256, 0, 0), (400, 64, 64))]), "outside the image"),
    "index out of range": (["--blocks", "{plan}", "--block-index", "0,4"], "out of range"),
    "index backwards": (["--blocks", "{plan}", "--block-index", "2-1"], "backwards"),
    "index not a number": (["--blocks", "{plan}", "--block-index", "one"], "not a number"),
    "--block-index without --blocks": (["--block-index", "0"], "give --blocks too"),
    "--blocks and --start": (["--blocks", "{plan}", "--start", "0,0,0", "--end", "128,64,64"], "not both"),
    "missing plan": (["--blocks", "{missing}"], "cannot read the block plan"),
    "malformed plan line": (["--blocks", "{bad}"], "is not a block"),
    "empty plan": (["--blocks", "{empty}"], "lists no blocks"),
}


@pytest.mark.parametrize("case", list(BAD_BLOCK_ARGS))
def test_bad_block_lists_are_one_error_line_and_write_nothing(sparse, model_path, cli_output, tmp_path, case):
    plans = {"plan": tmp_path / "plan.txt", "bad": tmp_path / "bad.txt", "empty": tmp_path / "empty.txt"}
    plans["plan"].write_text("".join(block_line(Box(s, e)) + "\n" for s, e in BLOCKS))
    plans["bad"].write_text(block_line(Box(*BLOCKS[0])) + "\n0,0,0,96,64\n")
    plans["empty"].write_text("\n  \n")
    names = {k: str(v) for k, v in plans.items()} | {"missing": str(tmp_path / "missing.txt")}
    args, message = BAD_BLOCK_ARGS[case]
    container, dataset_path, before = cli_output
    proc = run_script("segment_volume.py", *seg_args(sparse, container, model_path, *[a.format(**names) for a in args]))
    line = one_error_line(proc)
    assert message in line, line
    assert proc.stdout.strip() == ""
    assert tree_digest(dataset_path) == before  # no chunk, no marker, no record
    assert not (dataset_path / DONE_DIR).exists() and not (dataset_path / CONSTANT_DIR).exists()


def test_block_plan_lines_round_trip():
    boxes = [Box((0, 0, 0), (96, 64, 64)), Box((96, 32, 0), (384, 64, 1))]
    text = "".join(block_line(b) + "\n" for b in boxes)
    assert text == "0,0,0,96,64,64\n96,32,0,384,64,1\n"
    assert read_block_plan(text) == boxes
    assert read_block_plan("\n" + block_line(boxes[0]) + "  anything after a blank\n\n") == boxes[:1]
    assert parse_block_line(" 1,2,3,4,5,6 ") == Box((1, 2, 3), (4, 5, 6))
    for bad in ("1,2,3,4,5", "1,2,3,4,5,6,7", "a,b,c,d,e,f", ""):
        with pytest.raises(GeometryError):
            parse_block_line(bad)


def test_select_indices():
    assert select_indices("all", 4) == select_indices("", 4) == [0, 1, 2, 3]
    assert select_indices("0-3,7", 8) == [0, 1, 2, 3, 7]
    assert select_indices(" 2 , 0-1, 1 ", 3) == [2, 0, 1]  # in the order given, without repeats
    for bad, message in (("8", "out of range"), ("3-2", "backwards"), ("x", "not a number"), ("-1", "not a number")):
        with pytest.raises(GeometryError, match=message):
            select_indices(bad, 8)


# --------------------------------------------------------------------------------------------
# 4. Precision
# --------------------------------------------------------------------------------------------


def _has_gpu() -> bool:
    from exllsm_neuronseg.inference import import_tensorflow

    return bool(import_tensorflow().config.list_physical_devices("GPU"))


def test_bf16_agrees_with_fp32_and_has_its_own_marker(sparse, skip_run, model_path, tmp_path):
    from exllsm_neuronseg.inference import cpu_flags

    if not cpu_flags() & {"avx512_bf16", "amx_bf16"} and not _has_gpu():
        pytest.skip("this CPU has neither AVX512_BF16 nor AMX-BF16 (and there is no GPU): bf16 is refused here")
    _, fp32, _ = skip_run
    forget_predictors()
    out = new_output(tmp_path)
    box = ((0, 0, 0), SHAPE)
    first = segment_block(sparse, out, model_path, *box, scaling=SCALING, input_shape=TILE)
    assert not first.skipped
    proc = run_script("segment_volume.py", *seg_args(sparse, out.container, model_path, "--precision", "bf16"), check=True)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"block {Box(*box)}: 6 tiles (2 constant: no model)"), proc.stdout
    bf16 = read_all(out)
    delta = np.abs(bf16 - fp32)
    assert 0 < delta.max() < 0.1  # bf16 did run (not fp32 again), and agrees
    agreement = ((bf16 > 0.5) == (fp32 > 0.5)).mean()
    assert agreement >= 0.999, agreement
    fg32, fg16 = fp32 > 0.5, bf16 > 0.5
    assert fg32.sum() > 500 and (fg32 & fg16).sum() / (fg32 | fg16).sum() > 0.97  # IoU of the neurons
    marker = json.loads(marker_path(out, Box(*box)).read_text())
    assert marker["settings"]["precision"] == "bf16"
    assert len(list((out.path / CONSTANT_DIR).glob("*.npy"))) == 4  # the constants' answers per precision
    assert segment_block(sparse, out, model_path, *box, scaling=SCALING, input_shape=TILE, precision="bf16").skipped
    again = segment_block(sparse, out, model_path, *box, scaling=SCALING, input_shape=TILE)
    assert not again.skipped  # fp32 after bf16 re-segments
    np.testing.assert_array_equal(read_all(out), fp32)


def test_bf16_graph_agrees_with_fp32_on_any_cpu(model_path):
    """The bf16 graph itself (what GPUs and AVX512_BF16 CPUs run), on whatever CPU runs the tests:
    TensorFlow emulates bf16 where the CPU lacks it (slowly, which is why the CLI refuses it there),
    so its numbers are checked on every machine, not only where the end-to-end test above runs."""
    from exllsm_neuronseg.inference import TileEngine
    from exllsm_neuronseg.synthetic import SyntheticSpec, synthetic_volume
    from exllsm_neuronseg.unet import read_model_weights

    weights = read_model_weights(model_path)
    image, _ = synthetic_volume(SyntheticSpec(shape=(132, 132, 132)))
    tile = np.ascontiguousarray(image.transpose(2, 1, 0))  # z,y,x
    p = {
        precision: TileEngine(weights, (132, 132, 132), (44, 44, 44), axes="zyx", precision=precision).predict(tile, SCALING)
        for precision in ("fp32", "bf16")
    }
    assert p["bf16"].dtype == np.float32 and p["bf16"].shape == (44, 44, 44)
    delta = np.abs(p["bf16"] - p["fp32"]).max()
    assert 1e-4 < delta < 0.1, delta  # bf16 did run, and agrees
    fg32, fg16 = p["fp32"] > 0.5, p["bf16"] > 0.5
    assert fg32.sum() > 500 and (fg32 == fg16).mean() >= 0.999
    assert (fg32 & fg16).sum() / (fg32 | fg16).sum() > 0.97


def test_bf16_is_refused_on_cpus_without_it(monkeypatch):
    """bf16 runs on a CPU only with AVX512_BF16 or AMX-BF16 (the flags are read from the CPU; here
    both answers are checked with chosen flags), and fp16 never runs on a CPU."""
    tf = inference.import_tensorflow()
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible: bf16 and fp16 run there")
    monkeypatch.setattr(inference, "cpu_flags", lambda: {"avx2", "avx512f"})
    with pytest.raises(PrecisionError, match="bf16 needs a GPU or a CPU with AVX512_BF16 or AMX-BF16"):
        inference.check_precision_supported("bf16", tf)
    for flags in ({"avx512_bf16"}, {"amx_bf16", "avx2"}):
        monkeypatch.setattr(inference, "cpu_flags", lambda flags=flags: flags)
        assert inference.check_precision_supported("bf16", tf) == "CPU"
        with pytest.raises(PrecisionError, match="fp16 runs on GPUs only"):
            inference.check_precision_supported("fp16", tf)
    assert inference.check_precision_supported("fp32", tf) == "CPU"


def test_bf16_on_this_cpu_without_it_is_one_error_line(sparse, model_path, cli_output):
    """Where the CPU really lacks bf16 (an AMD EPYC Zen 3, say) the CLI says so in one line and
    writes nothing; the end-to-end bf16 test above runs on the other machines."""
    from exllsm_neuronseg.inference import cpu_flags

    if cpu_flags() & {"avx512_bf16", "amx_bf16"} or _has_gpu():
        pytest.skip("this machine runs bf16: test_bf16_agrees_with_fp32_and_has_its_own_marker covers it")
    container, dataset_path, before = cli_output
    proc = run_script("segment_volume.py", *seg_args(sparse, container, model_path, "--precision", "bf16"))
    line = one_error_line(proc)
    assert "bf16 needs a GPU or a CPU with AVX512_BF16 or AMX-BF16" in line, line
    assert tree_digest(dataset_path) == before


def test_fp32_markers_keep_the_settings_of_before(skip_run, sparse, model_path):
    """At fp32 and without a mask the marker records exactly the settings markers had before
    precision and masks existed, with the same fingerprint: finished blocks stay finished."""
    from exllsm_neuronseg.volume import dataset_identity

    _, _, out = skip_run
    marker = json.loads(marker_path(out, Box((0, 0, 0), SHAPE)).read_text())
    assert set(marker["settings"]) == OLD_SETTINGS
    old = {
        "model_sha256": hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
        "scaling": repr(float(SCALING)),
        "input": dataset_identity(sparse),
        "tile": TILE,
        "binary": False,
        "post_processing": None,
    }
    assert marker["fingerprint"] == run_fingerprint(old)


@pytest.fixture(scope="module")
def fp16_on_cpu(sparse, model_path, tmp_path_factory):
    if _has_gpu():
        pytest.skip("a GPU is visible: fp16 runs there")
    out = new_output(tmp_path_factory.mktemp("fp16"))
    before = tree_digest(out.path)
    proc = run_script("segment_volume.py", *seg_args(sparse, out.container, model_path, "--precision", "fp16"))
    return proc, before, tree_digest(out.path)


def test_fp16_on_a_cpu_is_refused_with_exit_2(fp16_on_cpu):
    proc, before, after = fp16_on_cpu
    assert proc.returncode == 2 and proc.stdout.strip() == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "fp16" in errors[0] and "GPU" in errors[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert after == before


def test_fp16_on_a_cpu_is_one_error_line(fp16_on_cpu):
    proc, _, _ = fp16_on_cpu
    one_error_line(proc)


def test_fp16_predictor_on_a_cpu_is_refused(model_path):
    from exllsm_neuronseg.inference import Predictor

    if _has_gpu():
        pytest.skip("a GPU is visible: fp16 runs there")
    with pytest.raises(PrecisionError, match="fp16"):
        Predictor(model_path, (108, 108, 108), precision="fp16")


@pytest.mark.parametrize("name", ["fp8", "FP32", "float32", ""])
def test_unknown_precision_is_one_error_line(sparse, model_path, cli_output, name):
    container, dataset_path, before = cli_output
    proc = run_script("segment_volume.py", *seg_args(sparse, container, model_path, "--precision", name))
    line = one_error_line(proc)
    assert f"precision {name!r} is not known" in line, line
    assert tree_digest(dataset_path) == before


# --------------------------------------------------------------------------------------------
# 5. One predictor owns the model
# --------------------------------------------------------------------------------------------


def test_unet_and_segment_import_neither_inference_nor_tensorflow():
    code = (
        "import sys\n"
        "import exllsm_neuronseg.unet\n"
        "print('inference' if 'exllsm_neuronseg.inference' in sys.modules else 'no inference')\n"
        "import exllsm_neuronseg.segment, exllsm_neuronseg.inference\n"
        "print('tensorflow' if 'tensorflow' in sys.modules else 'no tensorflow')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["no inference", "no tensorflow"], proc.stdout


def test_the_model_file_is_read_once_for_several_blocks(sparse, model_path, tmp_path, monkeypatch):
    import builtins
    import io

    import h5py

    model = Path(model_path).resolve()
    counts = {"read_bytes": 0, "open": 0, "h5py": 0}

    def is_model(arg) -> bool:
        try:
            return Path(os.fsdecode(arg)).resolve() == model
        except TypeError:
            return False

    real_read_bytes, real_open, real_io_open, real_h5 = Path.read_bytes, builtins.open, io.open, h5py.File

    def read_bytes(self):
        counts["read_bytes"] += is_model(self)
        return real_read_bytes(self)

    def counting(real):
        def opener(file, *args, **kwargs):
            counts["open"] += isinstance(file, (str, bytes, os.PathLike)) and is_model(file)
            return real(file, *args, **kwargs)

        return opener

    def h5_file(*args, **kwargs):
        counts["h5py"] += 1
        return real_h5(*args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(builtins, "open", counting(real_open))
    monkeypatch.setattr(io, "open", counting(real_io_open))
    monkeypatch.setattr(h5py, "File", h5_file)
    monkeypatch.setattr(inference, "_PREDICTORS", {})  # as in a new process
    out = new_output(tmp_path)
    results = segment_blocks(sparse, out, model_path, BLOCKS, scaling=SCALING, input_shape=TILE)
    assert len(results) == 3 and sum(r.model_tiles for r in results) == 4
    assert counts == {"read_bytes": 1, "open": 1, "h5py": 1}, counts
    # the same process segmenting more blocks (another output) reads and hashes it no more
    results = segment_blocks(sparse, new_output(tmp_path, "more.n5"), model_path, BLOCKS[:2], scaling=SCALING, input_shape=TILE)
    assert counts == {"read_bytes": 1, "open": 1, "h5py": 1}, counts


def test_predictor_owns_fingerprint_and_grid(model_path):
    from exllsm_neuronseg.geometry import TileGrid
    from exllsm_neuronseg.inference import Predictor, cached_predictor

    p = Predictor(model_path, output_shape=(68, 68, 68))
    assert p.input_shape == TILE and p.output_shape == (68, 68, 68)
    assert p.fingerprint == hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    assert p.grid == TileGrid(TILE, (68, 68, 68), 8) and p.grid.stride == (64, 64, 64) and p.context == (44, 44, 44)
    assert p.flops_per_tile() > 0 and not p.engine_loaded
    assert Predictor(model_path, image_shape=SHAPE).input_shape == (348, 156, 156)
    assert cached_predictor(model_path, (108, 108, 108)) is cached_predictor(model_path, (108, 108, 108))


def test_predictor_refuses_a_missing_model_a_directory_and_a_non_model(model_path, tmp_path):
    from exllsm_neuronseg.inference import Predictor

    with pytest.raises(ModelError, match="does not exist"):
        Predictor(tmp_path / "missing.h5", (108, 108, 108))
    with pytest.raises(ModelError, match="not a file"):
        Predictor(tmp_path, (108, 108, 108))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ModelError):
        Predictor(junk, (108, 108, 108))


def test_a_predictor_for_other_settings_is_refused_by_a_block(sparse, model_path, tmp_path):
    from exllsm_neuronseg.inference import Predictor

    out = new_output(tmp_path)
    before = tree_digest(out.path)
    box = ((0, 0, 0), (64, 64, 64))
    with pytest.raises(ValueError, match="axes xyz"):
        segment_block(sparse, out, Predictor(model_path, TILE), *box, scaling=SCALING)
    with pytest.raises(ValueError, match="binary"):
        segment_block(sparse, out, Predictor(model_path, TILE, axes="zyx", binary=True), *box, scaling=SCALING)
    with pytest.raises(GeometryError, match="tile shape"):
        segment_block(sparse, out, Predictor(model_path, TILE, axes="zyx"), *box, scaling=SCALING, input_shape=(108,) * 3)
    assert tree_digest(out.path) == before
    assert not (out.path / DONE_DIR).exists()
