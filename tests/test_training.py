"""The training stack: regions -> dataset -> training (+ resume) -> evaluation -> segmentation.

Unit tests pin the loss, the sampling edge cases, the augmentations and the metrics to known
answers.  The end-to-end tests train a small U-Net (1 block, 4 filters, tiles 84 -> 44) on
synthetic regions for about a minute on 2 CPU cores; on held-out synthetic data it must beat the
best single global intensity threshold, which cannot tell neurites from the equally bright
puncta.
"""

from __future__ import annotations

import csv
import json
import math

import h5py
import numpy as np
import pytest

from conftest import run_script
from exllsm_neuronseg import metrics as M
from exllsm_neuronseg.geometry import Box
from exllsm_neuronseg.training import (
    centre_crop,
    epoch_plan,
    occlude,
    random_affine,
    random_elastic,
    split_keys,
)
from exllsm_neuronseg.training_data import (
    Region,
    RegionTiling,
    crop_and_pad,
    prepare_dataset,
    thresholded_sampling,
    write_region,
)

TILE_IN, TILE_OUT = 84, 44  # valid for n_blocks = 1
MARGIN = (TILE_IN - TILE_OUT) // 2
REGION = "176,176,176"
EPOCHS, RESUMED_EPOCHS = 12, 2
NET = ["--n-blocks", "1", "--initial-filters", "4", "--model_input_size", f"{TILE_IN}," * 2 + str(TILE_IN),
       "--model_output_size", f"{TILE_OUT}," * 2 + str(TILE_OUT)]


def _xyz(v: int) -> str:
    return f"{v},{v},{v}"


# =============================================================================================
# Loss (spec 2.4)
# =============================================================================================


def _numpy_loss(y, z, w=(1.0, 5.0), lam=0.3, eps=1e-6):
    """The spec's formula, written out independently."""
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    axes = tuple(range(1, y.ndim - 1))
    ce = ((y * np.array(w)).sum(-1) * -(y * np.log(p)).sum(-1)).mean(axis=axes)
    dice = (2 * (p * y).sum(axis=axes) + eps) / ((p * p + y * y).sum(axis=axes) + eps)
    return (1 - lam) * ce + lam * (1 - dice.mean())


def test_loss_known_value_uniform_logits():
    from exllsm_neuronseg.training import weighted_cce_dice_loss

    # two voxels, one neuron and one background, logits 0 -> p = 0.5 everywhere
    y = np.zeros((1, 2, 1, 1, 2), np.float32)
    y[0, 0, 0, 0, 1] = 1
    y[0, 1, 0, 0, 0] = 1
    z = np.zeros_like(y)
    loss = weighted_cce_dice_loss((1, 5), 0.3)(y, z).numpy()
    # CE = (5 ln2 + 1 ln2) / 2 = 3 ln2; dice per class = (2*0.5) / (0.5 + 1) = 2/3 -> L_dice = 1/3
    expected = 0.7 * 3 * math.log(2) + 0.3 * (1 / 3)
    assert loss.shape == (1,)
    assert loss[0] == pytest.approx(expected, rel=1e-5)


def test_loss_matches_formula_on_a_batch_and_vanishes_when_perfect():
    from exllsm_neuronseg.training import weighted_cce_dice_loss

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(3, 4, 3, 2))
    y = np.eye(2, dtype=np.float32)[labels]
    z = rng.normal(0, 3, size=y.shape).astype(np.float32)
    got = weighted_cce_dice_loss((1, 5), 0.3)(y, z).numpy()
    np.testing.assert_allclose(got, _numpy_loss(y, z), rtol=1e-5)
    # the dice term is one value for the whole batch: changing sample 0 shifts sample 1's loss
    z2 = z.copy()
    z2[0] *= -1
    got2 = weighted_cce_dice_loss((1, 5), 0.3)(y, z2).numpy()
    assert got2[1] != pytest.approx(got[1], rel=1e-6)
    perfect = weighted_cce_dice_loss((1, 5), 0.3)(y, (2 * y - 1) * 40).numpy()
    assert perfect.max() < 1e-5
    # lambda = 0: pure weighted CE, normalised by voxel count (not by weight sum)
    ce_only = weighted_cce_dice_loss((1, 5), 0.0)(y, z).numpy()
    np.testing.assert_allclose(ce_only, _numpy_loss(y, z, lam=0.0), rtol=1e-5)


# =============================================================================================
# Tiling and sampling (spec 1.2)
# =============================================================================================


def test_tiling_grid_order_and_reflect_padding():
    tiling = RegionTiling((100, 60, 50), (84, 84, 84), (44, 44, 44))
    assert tiling.grid == (3, 2, 2) and len(tiling) == 12
    assert tiling.grid_index(1) == (0, 0, 1)  # z fastest
    assert tiling.grid_index(5) == (1, 0, 1)
    assert tiling.output_box(5) == Box((44, 0, 44), (88, 44, 88))
    assert tiling.input_box(0) == Box((-20, -20, -20), (64, 64, 64))
    a = np.arange(100 * 60 * 50, dtype=np.int64).reshape(100, 60, 50)
    tile = crop_and_pad(a, tiling.input_box(0))
    assert tile.shape == (84, 84, 84)
    np.testing.assert_array_equal(tile, np.pad(a, 20, mode="reflect")[:84, :84, :84])


def test_sampling_no_high_tiles_all_high_tiles_and_too_few_tiles():
    idx = np.arange(30)
    rng = np.random.default_rng(0)
    none_high = thresholded_sampling(idx, np.zeros(30), 0.001, 0.9, 10, rng)
    all_high = thresholded_sampling(idx, np.ones(30), 0.001, 0.9, 10, rng)
    for chosen in (none_high, all_high):
        assert len(chosen) == 10 and len(set(chosen.tolist())) == 10 and set(chosen) <= set(idx)
    few = thresholded_sampling(idx[:5], np.array([0, 0.5, 0, 0, 0.2]), 0.001, 0.9, 50, rng)
    assert sorted(few.tolist()) == [0, 1, 2, 3, 4]
    assert len(thresholded_sampling(idx, np.zeros(30), n_samples=0, rng=rng)) == 0


def test_sampling_favours_high_tiles_at_the_ratio():
    idx = np.arange(200)
    props = np.r_[np.full(100, 0.05), np.zeros(100)]
    counts = [np.sum(thresholded_sampling(idx, props, 0.001, r, 50, np.random.default_rng(s)) < 100)
              for r in (0.9, 0.1) for s in range(5)]
    # weighted sampling without replacement: the share is only approximately r
    assert 40 <= np.mean(counts[:5]) <= 48 and min(counts[:5]) >= 35  # r = 0.9: about 45 of 50 high
    assert np.mean(counts[5:]) <= 10  # r = 0.1: about 5 of 50 high


def _small_region(path, seed=0, label=True):
    from exllsm_neuronseg.synthetic import SyntheticSpec, synthetic_volume

    image, lab = synthetic_volume(SyntheticSpec(shape=(60, 50, 40), n_tubes=3, n_puncta=10, seed=seed))
    return write_region(path, image, lab if label else np.zeros_like(lab))


def test_prepare_dataset_layout_on_a_small_region(tmp_path):
    from exllsm_neuronseg.scaling import scaling_factor

    path = _small_region(tmp_path / "R" / "R.h5")
    empty = _small_region(tmp_path / "E.h5", seed=1, label=False)  # no neuron at all: no high tile
    out = tmp_path / "data.h5"
    summary = prepare_dataset(
        [Region("R", path), Region("E", empty)], out, tmp_path / "diag", (84,) * 3, (44,) * 3,
        samples_per_region=50, seed=3,
    )
    r, e = summary.regions
    assert r.n_tiles == 2 * 2 * 1 and r.n_candidates == 4 and len(r.chosen) == 4  # capped, no assertion error
    assert e.n_high_candidates == 0 and len(e.chosen) == 4
    with h5py.File(path) as h:
        raw, truth = h["t0/channel0"][...], h["t0/channel2"][...]
    factor = scaling_factor(raw)
    tiling = RegionTiling(raw.shape, (84,) * 3, (44,) * 3)
    with h5py.File(out) as h5:
        assert sorted(h5.keys()) == sorted([f"R{i}" for i in range(4)] + [f"E{i}" for i in range(4)])
        g = h5["R3"]
        assert g["image"].dtype == np.float32 and g["mask"].dtype == np.int32
        assert g["image"].shape == g["mask"].shape == (84, 84, 84)
        assert g.attrs["region"] == "R" and int(g.attrs["tile_index"]) == 3
        np.testing.assert_allclose(g["image"][...], crop_and_pad(raw.astype(np.float32) * np.float32(factor), tiling.input_box(3)))
        np.testing.assert_array_equal(g["mask"][...], crop_and_pad(np.clip(truth, 0, 1), tiling.input_box(3)))
    for name in ("region_R_histogramm_counts", "region_R_histogramm_bins", "region_R_hist.png", "region_R_expFit.png"):
        assert (tmp_path / "diag" / name).is_file()
    assert len(np.loadtxt(tmp_path / "diag" / "region_R_histogramm_counts")) == 100
    # same seed, same draw; re-running overwrites the same keys
    again = prepare_dataset([Region("R", path)], out, None, (84,) * 3, (44,) * 3, samples_per_region=2, seed=3)
    again2 = prepare_dataset([Region("R", path)], tmp_path / "d2.h5", None, (84,) * 3, (44,) * 3, samples_per_region=2, seed=3)
    assert again.regions[0].chosen == again2.regions[0].chosen
    assert again.n_examples == 8


def test_prepare_dataset_cli_reports_missing_regions(tmp_path):
    proc = run_script("prepare_dataset.py", "--region-dir", tmp_path, "--dataset-dir", tmp_path / "d.h5")
    assert proc.returncode == 2
    assert "A1" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    path = _small_region(tmp_path / "X.h5")
    proc = run_script("prepare_dataset.py", "--region-file", path, "--raw-dataset", "t0/nope", "--dataset-dir", tmp_path / "d.h5")
    assert proc.returncode == 2 and "t0/nope" in proc.stderr and "t0/channel0" in proc.stderr


# =============================================================================================
# Augmentation, split, epoch plan
# =============================================================================================


def test_affine_crop_equals_full_transform_then_crop():
    rng = np.random.default_rng(1)
    image = rng.random((30, 30, 30), dtype=np.float32)
    mask = (image > 0.7).astype(np.int32)
    full_i, full_m = random_affine(image, mask, np.random.default_rng(5))
    crop_i, crop_m = random_affine(image, mask, np.random.default_rng(5), (20, 20, 20), (10, 10, 10))
    np.testing.assert_allclose(crop_i, centre_crop(full_i, (20, 20, 20)), atol=1e-6)
    np.testing.assert_array_equal(crop_m, centre_crop(full_m, (10, 10, 10)))
    assert crop_i.dtype == np.float32 and crop_m.dtype == np.int32 and set(np.unique(crop_m)) <= {0, 1}
    assert not np.allclose(full_i, image)


def test_occlusion_size_is_used():
    for size in (5, 9):
        image = np.ones((20, 20, 20), np.float32)
        occlude(image, np.random.default_rng(0), size)
        assert np.count_nonzero(image == 0) == size**3
    cropped = np.ones((10, 10, 10), np.float32)  # a crop of a 20^3 example: the cube is clipped to it
    zeros = [np.count_nonzero(occlude(cropped.copy(), np.random.default_rng(s), 8, (20, 20, 20)) == 0) for s in range(20)]
    assert max(zeros) <= 512 and min(zeros) < 512


def test_elastic_deformation():
    rng = np.random.default_rng(2)
    image = rng.random((24, 24, 24), dtype=np.float32)
    mask = (image > 0.8).astype(np.int32)
    _, same = random_elastic(image, mask, np.random.default_rng(0), sigma=0.0)
    np.testing.assert_array_equal(same, mask)  # no displacement, nearest neighbour
    out_i, out_m = random_elastic(image, mask, np.random.default_rng(0), sigma=4.0)
    assert out_i.shape == image.shape and out_i.dtype == np.float32 and out_m.dtype == np.int32
    assert set(np.unique(out_m)) <= {0, 1} and not np.array_equal(out_m, mask)


def test_validation_split_and_epoch_plan():
    keys = [f"k{i}" for i in range(10)]
    train, val = split_keys(keys, 0.2, seed=4)
    assert len(val) == 2 and sorted(train + val) == sorted(keys)
    assert split_keys(keys, 0.2, seed=4) == (train, val)
    assert split_keys(["a", "b", "c"], 0.01, 0)[1].__len__() == 1  # ceil
    assert split_keys(["a"], 0.5, 0) == (["a"], [])  # never an empty training set
    assert split_keys(keys, 0.0, 0)[1] == []
    order, seeds = epoch_plan(5, 2, seed=1, epoch=3)
    assert len(order) == 6 and set(order[:5]) == set(range(5)) and len(set(seeds)) == 6
    np.testing.assert_array_equal(order, epoch_plan(5, 2, 1, 3)[0])


# =============================================================================================
# Metrics (known answers)
# =============================================================================================


def test_voxel_metrics_known_answers():
    truth = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    pred = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    cm = M.confusion_matrix(pred, truth)
    assert cm.tolist() == [[3, 1], [1, 3]]
    assert M.pixel_accuracy(cm) == 0.75
    assert M.mean_iou(cm) == pytest.approx(0.6)  # both classes 3 / (3 + 1 + 1)
    prob = np.array([0.1, 0.4, 0.6, 0.9])
    t = np.array([0, 1, 0, 1])
    tp, fp = M.threshold_counts(prob, t, [0.0, 0.5, 0.95, 1.0])
    precision, recall = M.precision_recall(tp, fp, 2)
    assert precision.tolist() == [0.5, 0.5, 1.0, 1.0] and recall.tolist() == [1.0, 0.5, 0.0, 0.0]
    assert M.roc_auc(prob, t) == 0.75
    assert math.isnan(M.roc_auc(prob, np.zeros(4)))


def test_precision_recall_match_the_originals_curve_sampling():
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(0)
    truth = rng.random(2000) < 0.3
    prob = np.clip(truth * 0.3 + rng.random(2000) * 0.7, 0, 0.999)
    precision, recall, thr = precision_recall_curve(truth, prob)
    tp, fp = M.threshold_counts(prob, truth)
    p, r = M.precision_recall(tp, fp, int(truth.sum()))
    for i, t in enumerate(M.THRESHOLDS):
        idx = int(np.sum(thr < t))  # the original's sampling of the sklearn curve
        assert p[i] == pytest.approx(precision[idx]) and r[i] == pytest.approx(recall[idx])


def test_object_counts_26_connectivity():
    truth = np.zeros((12, 12, 12), bool)
    truth[1:3, 1:3, 1:3] = True  # object A
    truth[8:10, 8:10, 8:10] = True  # object B (missed)
    pred = np.zeros_like(truth)
    pred[2, 2, 2] = True  # hits A ...
    pred[3, 3, 3] = True  # ... and touches it only at a corner: same component with 26-connectivity
    pred[6, 0, 0] = True  # spurious
    counts = M.object_counts(pred, truth)
    assert counts == M.ObjectCounts(predicted=2, predicted_matched=1, true=2, true_found=1)
    assert counts.precision == 0.5 and counts.recall == 0.5
    total = counts + M.object_counts(truth, truth)
    assert (total.predicted, total.predicted_matched, total.true, total.true_found) == (4, 3, 4, 3)


def test_threshold_baseline_and_one_example_accumulation():
    truth = np.zeros((10, 10, 10), bool)
    truth[2:5, 2:5, 2:5] = True
    image = truth * 1.0 + 0.1
    base = M.best_threshold_baseline([image], [truth])
    assert base.f1 == 1.0 and base.iou == 1.0 and 0.1 < base.threshold <= 1.1
    acc = M.EvaluationAccumulator()
    acc.add("only", np.where(truth, 0.9, 0.2).astype(np.float32), truth, image, loss=0.5)
    report = acc.report("d.h5", "m.h5")  # a single example is enough
    assert report.pixel_accuracy == 1.0 and report.f1 == 1.0 and report.roc_auc == 1.0
    assert report.precision[M.THRESHOLDS.index(0.5)] == 1.0 and len(report.thresholds) == 21
    json.dumps(report.to_dict())  # NaN-free JSON


# =============================================================================================
# End to end: regions -> dataset -> train -> resume -> evaluate -> segment
# =============================================================================================


@pytest.fixture(scope="session")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    run_script("make_training_regions.py", "--output-dir", root / "regions", "--names", "A1,A2", "--shape", REGION,
               "--n-tubes", "12", "--n-puncta", "1000", "--seed", "1", check=True)
    run_script("make_training_regions.py", "--output-dir", root / "heldout", "--names", "H1", "--shape", REGION,
               "--n-tubes", "12", "--n-puncta", "1000", "--seed", "100", check=True)
    prep = run_script("prepare_dataset.py", "--region-dir", root / "regions", "--regions", "A1,A2",
                      "--dataset-dir", root / "train.h5", "--output-dir", root / "diag", "--samples-per-region", "24",
                      "--tile-input-shape", _xyz(TILE_IN), "--tile-output-shape", _xyz(TILE_OUT), "--seed", "0", check=True)
    run_script("prepare_dataset.py", "--region-file", root / "heldout" / "H1" / "H1.h5", "--dataset-dir", root / "heldout.h5",
               "--samples-per-region", "16", "--tile-input-shape", _xyz(TILE_IN), "--tile-output-shape", _xyz(TILE_OUT),
               "--seed", "0", check=True)
    return root, prep


@pytest.fixture(scope="session")
def trained(datasets):
    root, _ = datasets
    proc = run_script("train_unet.py", "--training-dataset", root / "train.h5", "--output-dir", root / "model",
                      "--model-name", "m", *NET, "--epochs", str(EPOCHS), "--seed", "0", check=True)
    return root / "model", proc


@pytest.fixture(scope="session")
def resumed(trained, datasets):
    root, _ = datasets
    out, _ = trained
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("m*.h5")}
    proc = run_script("train_unet.py", "--training-dataset", root / "train.h5", "--output-dir", out,
                      "--model-name", "m", *NET, "--epochs", str(RESUMED_EPOCHS), "--resume", check=True)
    return out, proc, before


def test_prepare_dataset_cli(datasets):
    root, proc = datasets
    assert proc.stdout.strip().startswith(f"dataset {root / 'train.h5'}: wrote 48 examples from 2 region(s) [A1,A2]")
    with h5py.File(root / "train.h5") as h5:
        assert len(h5) == 48 and all(k[:2] in ("A1", "A2") for k in h5)
    assert (root / "diag" / "region_A2_expFit.png").is_file()


def test_training_outputs(trained):
    out, proc = trained
    assert f"epochs 1-{EPOCHS} on 38 examples (10 validation)" in proc.stdout
    assert "oneDNN" not in proc.stderr and "absl" not in proc.stderr  # TensorFlow's start-up lines
    for e in range(1, EPOCHS + 1):
        assert (out / f"m{e}.h5").is_file() and (out / f"m{e}.state.npz").is_file()
    for name in ("m_best.h5", "m_split.json", "loss.png", "accuracy.png", "iou.png"):
        assert (out / name).is_file()
    split = json.loads((out / "m_split.json").read_text())
    assert len(split["training"]) == 38 and len(split["validation"]) == 10
    assert not set(split["training"]) & set(split["validation"])


def test_resume_continues_epochs_and_optimizer_state(trained, resumed):
    from exllsm_neuronseg.training import load_training_state

    out, proc, before = resumed
    last = EPOCHS + RESUMED_EPOCHS
    assert f"resuming from {out / f'm{EPOCHS}.h5'} at epoch {EPOCHS}" in proc.stderr
    assert f"epochs {EPOCHS + 1}-{last}" in proc.stdout
    # earlier checkpoints are not overwritten; new ones continue the numbering
    for e in range(1, EPOCHS + 1):
        assert (out / f"m{e}.h5").stat().st_mtime_ns == before[f"m{e}.h5"]
    assert (out / f"m{last}.h5").is_file()
    with (out / "m.log").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "acc", "loss", "meanIoU", "val_acc", "val_loss", "val_meanIoU"]
    assert [int(r["epoch"]) for r in rows] == list(range(last))
    # Adam's step counter carries on (a fresh optimizer would restart at 0) and its moments too
    values, names, info = load_training_state(out / f"m{last}.state.npz")
    first, first_names, first_info = load_training_state(out / f"m{EPOCHS}.state.npz")
    assert info["epoch"] == last and first_info["epoch"] == EPOCHS
    assert int(values[names.index("adam/iteration")]) == 38 * last
    assert int(first[first_names.index("adam/iteration")]) == 38 * EPOCHS
    assert info["seed"] == first_info["seed"] == 0


def _heldout_baseline(path):
    """Best single global threshold on the scaled inputs, over the model-output area of each example."""
    images, truths = [], []
    with h5py.File(path) as h5:
        for k in sorted(h5):
            crop = (slice(MARGIN, MARGIN + TILE_OUT),) * 3
            images.append(h5[k]["image"][crop])
            truths.append(h5[k]["mask"][crop] > 0)
    image, truth = np.concatenate([i.ravel() for i in images]), np.concatenate([t.ravel() for t in truths])
    best = 0.0
    for t in np.quantile(image, np.linspace(0.8, 0.9999, 400)):
        pred = image >= t
        best = max(best, 2 * np.count_nonzero(pred & truth) / (pred.sum() + truth.sum()))
    return best


def test_trained_model_beats_the_best_global_threshold_on_heldout_data(resumed, datasets, tmp_path):
    root, _ = datasets
    out, _, _ = resumed
    proc = run_script("evaluate_unet.py", "--dataset", root / "heldout.h5", "--model-path", out / "m_best.h5",
                      "--output-dir", tmp_path, "--n-examples", "0", "--model_shape", _xyz(TILE_OUT),
                      "--visualization-interval", "8", check=True)
    report = json.loads((tmp_path / "report.json").read_text())
    assert "oneDNN" not in proc.stderr and "absl" not in proc.stderr  # TensorFlow's start-up lines
    baseline = _heldout_baseline(root / "heldout.h5")
    print(f"held-out F1: model {report['f1']:.4f}, best global threshold {baseline:.4f} "
          f"(report's own search {report['threshold_baseline']['f1']:.4f})")
    assert report["n_examples"] == 16
    assert report["threshold_baseline"]["f1"] == pytest.approx(baseline, abs=0.01)
    assert report["f1"] > baseline + 0.02
    assert report["foreground_iou"] > report["threshold_baseline"]["iou"]
    assert report["roc_auc"] > 0.95 and report["pixel_accuracy"] > 0.98
    assert len(report["precision"]) == len(report["recall"]) == 21 and report["recall"][0] == 1.0
    assert report["objects"]["true"] > 0 and report["object_recall"] > 0.5
    for name in ("report.txt", "PrecisionRecall.png", "PrecisionRecallExamples.png", "val_7_3_overlay.png", "val_15_0_im.png"):
        assert (tmp_path / name).is_file()
    assert "pixel wise accuracy : " in (tmp_path / "report.txt").read_text()
    assert proc.stdout.strip().startswith("evaluated m_best.h5 on 16 examples")


def test_segment_volume_uses_the_trained_model(resumed, tmp_path):
    from exllsm_neuronseg.scaling import scaling_factor
    from exllsm_neuronseg.synthetic import SyntheticSpec, synthetic_volume, write_synthetic_n5
    from exllsm_neuronseg.volume import open_volume

    out, _, _ = resumed
    spec = SyntheticSpec(shape=(96, 88, 80), n_tubes=5, n_puncta=60, seed=11)
    image = write_synthetic_n5(str(tmp_path / "in.n5"), "c1/s0", spec, chunks=(48, 44, 40))
    _, label = synthetic_volume(spec)
    factor = scaling_factor(image)
    run_script("create_volume.py", "-i", tmp_path / "in.n5", "-id", "c1/s0", "-o", tmp_path / "out.n5", "-od", "c1/s0",
               check=True)
    proc = run_script("segment_volume.py", "-i", tmp_path / "in.n5", "-id", "c1/s0", "-o", tmp_path / "out.n5",
                      "-od", "c1/s0", "-m", out / "m_best.h5", "-s", repr(factor), "--no-progress", check=True)
    # no tile flags: the default tiles for this image and the model's depth (n_blocks=1: grid 4)
    from exllsm_neuronseg.unet import default_tile_shape, output_size

    strides = [output_size(s, 1) // 4 * 4 for s in default_tile_shape(spec.shape, 1)]
    n_tiles = np.prod([-(-n // stride) for n, stride in zip(spec.shape, strides)])
    assert f": {n_tiles} tiles in" in proc.stdout
    prob = np.asarray(open_volume(tmp_path / "out.n5", "c1/s0").read(Box((0, 0, 0), spec.shape)))
    assert prob.shape == spec.shape and 0.0 <= prob.min() and prob.max() <= 1.0
    pred, truth = prob > 0.5, label > 0
    f1 = 2 * np.count_nonzero(pred & truth) / (pred.sum() + truth.sum())
    print(f"segment_volume F1 vs truth: {f1:.3f} ({proc.stdout.strip()})")
    assert f1 > 0.6
