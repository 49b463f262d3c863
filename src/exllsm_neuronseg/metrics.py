"""Evaluation metrics of a neuron model on a prepared dataset (spec section 3, with its bugs fixed).

Voxel metrics, over every chosen example pooled (no example is dropped, any count >= 1):

* pixel accuracy and mean IoU (mean over classes of ``TP / (TP + FP + FN)``) of the argmax;
* precision and recall at thresholds 0, 0.05, ..., 1 (a voxel is positive when ``p >= t``;
  precision is 1 where nothing is predicted, as in scikit-learn's curve);
* ROC AUC (``sklearn.metrics.roc_auc_score``; NaN when the truth has a single class).

Object metrics, as Janelia scores neuron models: 26-connected components of the prediction
(``p > object_threshold``) and of the truth, per example; a predicted component is a true
positive if it overlaps the truth, and a true component is found if it overlaps the prediction.

For reference the report also holds the **best single global intensity threshold** on the
(scaled) input: the F1 an oracle threshold reaches without any model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import DatasetError, GeometryError, ParameterError
from .training_data import save_figure

log = logging.getLogger(__name__)

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------
# Voxel metrics
# --------------------------------------------------------------------------------------------


def confusion_matrix(predicted: np.ndarray, truth: np.ndarray, n_classes: int = 2) -> np.ndarray:
    """``cm[t, p]``: voxels of true class ``t`` predicted as ``p``."""
    t = np.asarray(truth).astype(np.int64).ravel()
    p = np.asarray(predicted).astype(np.int64).ravel()
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def pixel_accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else math.nan


def class_iou(cm: np.ndarray) -> np.ndarray:
    """Per-class ``TP / (TP + FP + FN)``; NaN for a class absent from truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    denominator = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, tp / denominator, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean over classes present in truth or prediction (Keras ``MeanIoU``)."""
    iou = class_iou(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan


def threshold_counts(
    prob: np.ndarray, truth: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives at each threshold (a voxel is positive when ``prob >= t``)."""
    prob = np.asarray(prob).ravel()
    truth = np.asarray(truth).ravel().astype(bool)
    tp = np.array([np.count_nonzero(prob[truth] >= t) for t in thresholds], dtype=np.int64)
    fp = np.array([np.count_nonzero(prob[~truth] >= t) for t in thresholds], dtype=np.int64)
    return tp, fp


def precision_recall(tp: np.ndarray, fp: np.ndarray, n_positive: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision (1 where nothing is predicted) and recall (NaN when the truth is empty)."""
    tp, fp = np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64)
    predicted = tp + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 1.0)
        recall = tp / n_positive if n_positive else np.full_like(tp, np.nan)
    return precision, recall


def roc_auc(prob: np.ndarray, truth: np.ndarray) -> float:
    """``sklearn.metrics.roc_auc_score``; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth).ravel().astype(bool)
    if truth.all() or not truth.any():
        return math.nan
    return float(roc_auc_score(truth, np.asarray(prob).ravel()))


def f1_iou(tp: int, n_predicted: int, n_true: int) -> tuple[float, float]:
    """Foreground F1 (Dice) and IoU from counts."""
    union = n_predicted + n_true - tp
    f1 = 2 * tp / (n_predicted + n_true) if n_predicted + n_true else math.nan
    return float(f1), float(tp / union) if union else math.nan


# --------------------------------------------------------------------------------------------
# Object metrics
# --------------------------------------------------------------------------------------------


@dataclass
class ObjectCounts:
    predicted: int = 0
    predicted_matched: int = 0
    true: int = 0
    true_found: int = 0

    def __add__(self, other: "ObjectCounts") -> "ObjectCounts":
        return ObjectCounts(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    @property
    def precision(self) -> float:
        return self.predicted_matched / self.predicted if self.predicted else math.nan

    @property
    def recall(self) -> float:
        return self.true_found / self.true if self.true else math.nan


def object_counts(predicted: np.ndarray, truth: np.ndarray) -> ObjectCounts:
    """Count 26-connected components of each mask and those overlapping the other mask."""
    from scipy.ndimage import label

    predicted = np.asarray(predicted, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    pred_labels, n_pred = label(predicted, structure=STRUCTURE_26)
    true_labels, n_true = label(truth, structure=STRUCTURE_26)
    matched = np.unique(pred_labels[truth & predicted])
    found = np.unique(true_labels[truth & predicted])
    return ObjectCounts(int(n_pred), int(np.count_nonzero(matched)), int(n_true), int(np.count_nonzero(found)))


# --------------------------------------------------------------------------------------------
# Threshold baseline
# --------------------------------------------------------------------------------------------


@dataclass
class ThresholdBaseline:
    """The best single global threshold on the input intensities (``value >= threshold``)."""

    threshold: float
    f1: float
    iou: float


def best_threshold_baseline(images: Sequence[np.ndarray], truths: Sequence[np.ndarray], n_bins: int = 4096) -> ThresholdBaseline:
    """Search ``n_bins`` thresholds evenly spread over the value range for the best foreground F1."""
    values = np.concatenate([np.asarray(i, dtype=np.float64).ravel() for i in images])
    truth = np.concatenate([np.asarray(t).ravel().astype(bool) for t in truths])
    n_true = int(truth.sum())
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo or n_true == 0:
        return ThresholdBaseline(lo, math.nan, math.nan)
    edges = np.linspace(lo, hi, n_bins + 1)
    fg, _ = np.histogram(values[truth], bins=edges)
    bg, _ = np.histogram(values[~truth], bins=edges)
    # predicted positive at edge k: every bin from k upwards
    tp = np.cumsum(fg[::-1])[::-1]
    predicted = tp + np.cumsum(bg[::-1])[::-1]
    f1 = 2 * tp / (predicted + n_true)
    k = int(np.argmax(f1))
    return ThresholdBaseline(float(edges[k]), float(f1[k]), float(tp[k] / (predicted[k] + n_true - tp[k])))


# --------------------------------------------------------------------------------------------
# Accumulating over examples
# --------------------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    dataset: str
    model: str
    keys: list[str]
    loss: float
    pixel_accuracy: float
    mean_iou: float
    foreground_iou: float
    f1: float
    thresholds: list[float]
    precision: list[float]
    recall: list[float]
    roc_auc: float
    roc_auc_voxels: int
    objects: ObjectCounts
    object_threshold: float
    threshold_baseline: ThresholdBaseline
    example_precision: list[list[float]] = field(default_factory=list)
    example_recall: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_examples"] = len(self.keys)
        d["object_precision"] = self.objects.precision
        d["object_recall"] = self.objects.recall
        return _finite(d)

    def to_text(self) -> str:
        table = "".join(f"{t:.2f} {p:.2f} {r:.2f}\n" for t, p, r in zip(self.thresholds, self.precision, self.recall))
        b = self.threshold_baseline
        lines = [
            ("evaluation dataset", self.dataset),
            ("model file", self.model),
            ("number of evaluation examples", len(self.keys)),
            ("evaluation example keys", self.keys),
            ("loss", self.loss),
            ("pixel wise accuracy", self.pixel_accuracy),
            ("mean IoU", self.mean_iou),
            ("foreground IoU", self.foreground_iou),
            ("foreground F1", self.f1),
            ("binary classification performance", "\nthreshold precision recall\n" + table),
            ("mean auc", self.roc_auc),
            ("object precision", f"{self.objects.precision} ({self.objects.predicted_matched}/{self.objects.predicted})"),
            ("object recall", f"{self.objects.recall} ({self.objects.true_found}/{self.objects.true})"),
            ("best global threshold baseline", f"threshold {b.threshold:.6g} F1 {b.f1} IoU {b.iou}"),
        ]
        return "".join(f"{k} : {v}\n" for k, v in lines)

    def summary(self) -> str:
        b = self.threshold_baseline
        return (
            f"evaluated {Path(self.model).name} on {len(self.keys)} examples: pixel accuracy {self.pixel_accuracy:.4f}, "
            f"mean IoU {self.mean_iou:.4f}, F1 {self.f1:.4f} (best global threshold: {b.f1:.4f}), "
            f"ROC AUC {self.roc_auc:.4f}, objects precision {self.objects.precision:.3f} recall "
            f"{self.objects.recall:.3f}; {self.seconds:.1f} s"
        )


def _finite(value):
    """JSON has no NaN: map non-finite floats to None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class EvaluationAccumulator:
    """Collects per-example predictions and produces an :class:`EvaluationReport`."""

    def __init__(
        self,
        thresholds: Sequence[float] = THRESHOLDS,
        object_threshold: float = 0.5,
        max_auc_voxels: int = 50_000_000,
        seed: int = 0,
    ) -> None:
        self.thresholds = list(thresholds)
        self.object_threshold = object_threshold
        self.max_auc_voxels = max_auc_voxels
        self.seed = seed
        self.keys: list[str] = []
        self.cm = np.zeros((2, 2), dtype=np.int64)
        self.tp = np.zeros(len(self.thresholds), dtype=np.int64)
        self.fp = np.zeros(len(self.thresholds), dtype=np.int64)
        self.n_positive = 0
        self.losses: list[float] = []
        self.objects = ObjectCounts()
        self.probs: list[np.ndarray] = []
        self.truths: list[np.ndarray] = []
        self.images: list[np.ndarray] = []
        self.example_pr: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, key: str, prob: np.ndarray, truth: np.ndarray, image: np.ndarray | None = None, loss: float = math.nan) -> None:
        """One example: foreground probability, 0/1 truth and (optionally) the input at the same size."""
        if prob.shape != truth.shape:
            raise GeometryError(f"prediction {prob.shape} and truth {truth.shape} differ in shape")
        truth = np.asarray(truth) > 0
        self.keys.append(key)
        self.cm += confusion_matrix(prob > 0.5, truth)
        tp, fp = threshold_counts(prob, truth, self.thresholds)
        self.tp += tp
        self.fp += fp
        n_pos = int(truth.sum())
        self.n_positive += n_pos
        self.example_pr.append(precision_recall(tp, fp, n_pos))
        self.objects = self.objects + object_counts(prob > self.object_threshold, truth)
        self.losses.append(float(loss))
        self.probs.append(np.asarray(prob, dtype=np.float32).ravel())
        self.truths.append(truth.ravel())
        if image is not None:
            self.images.append(np.asarray(image, dtype=np.float32))

    def report(self, dataset: str, model: str) -> EvaluationReport:
        if not self.keys:
            raise DatasetError("no examples were evaluated")
        precision, recall = precision_recall(self.tp, self.fp, self.n_positive)
        prob = np.concatenate(self.probs)
        truth = np.concatenate(self.truths)
        if prob.size > self.max_auc_voxels:
            pick = np.random.default_rng(self.seed).choice(prob.size, self.max_auc_voxels, replace=False)
            prob, truth = prob[pick], truth[pick]
        tp = int(self.cm[1, 1])
        f1, fg_iou = f1_iou(tp, int(self.cm[:, 1].sum()), int(self.cm[1].sum()))
        baseline = (
            best_threshold_baseline(self.images, [t.reshape(i.shape) for t, i in zip(self.truths, self.images)])
            if len(self.images) == len(self.keys)
            else ThresholdBaseline(math.nan, math.nan, math.nan)
        )
        return EvaluationReport(
            dataset=dataset,
            model=model,
            keys=list(self.keys),
            loss=float(np.nanmean(self.losses)) if np.isfinite(self.losses).any() else math.nan,
            pixel_accuracy=pixel_accuracy(self.cm),
            mean_iou=mean_iou(self.cm),
            foreground_iou=fg_iou,
            f1=f1,
            thresholds=self.thresholds,
            precision=precision.tolist(),
            recall=recall.tolist(),
            roc_auc=roc_auc(prob, truth),
            roc_auc_voxels=int(prob.size),
            objects=self.objects,
            object_threshold=self.object_threshold,
            threshold_baseline=baseline,
            example_precision=[p.tolist() for p, _ in self.example_pr],
            example_recall=[r.tolist() for _, r in self.example_pr],
        )


# --------------------------------------------------------------------------------------------
# Plots and the evaluation run
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_precision_recall(report: EvaluationReport, output_dir: Path) -> None:
    """``PrecisionRecall.png`` (pooled, annotated with the ROC AUC) and ``PrecisionRecallExamples.png``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(report.recall, report.precision, "-o", markersize=3)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.text(0.05, 0.05, f"roc auc : {report.roc_auc:.4f}")
    fig.tight_layout()
    save_figure(fig, output_dir / "PrecisionRecall.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    for key, p, r in zip(report.keys, report.example_precision, report.example_recall):
        ax.plot(r, p, linewidth=0.8, label=key)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    if len(report.keys) <= 10:
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, output_dir / "PrecisionRecallExamples.png")
    plt.close(fig)


def plot_example(n: int, image: np.ndarray, truth: np.ndarray, prob: np.ndarray, output_dir: Path) -> None:
    """``val_<n>_0_im.png``, ``_1_true.png``, ``_2_pred.png``, ``_3_overlay.png``: 6 z-slices each."""
    plt = _pyplot()
    zs = np.linspace(0, truth.shape[2], 8).astype(int)[1:-1]
    overlay = np.zeros((*truth.shape, 3), dtype=np.float32)
    overlay[..., 0] = truth
    overlay[..., 1] = prob
    for suffix, data, kwargs in (
        ("0_im", image, {"cmap": "gray", "vmin": 0, "vmax": 1}),
        ("1_true", truth, {"vmin": 0, "vmax": 1}),
        ("2_pred", prob, {"vmin": 0, "vmax": 1}),
        ("3_overlay", overlay, {}),
    ):
        fig, axes = plt.subplots(1, len(zs), figsize=(2 * len(zs), 2.2))
        for ax, z in zip(axes, zs):
            ax.imshow(data[:, :, z], **kwargs)
            ax.set_title(f"z={z}", fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        save_figure(fig, output_dir / f"val_{n}_{suffix}.png", dpi=60)
        plt.close(fig)


def choose_keys(keys: Sequence[str], n_examples: int, seed: int) -> list[str]:
    """A seeded random choice of ``n_examples`` keys (all of them when ``n_examples`` is 0 or too few).

    Raises :class:`ParameterError` for a negative count.
    """
    if n_examples < 0:
        raise ParameterError(f"number of examples {n_examples} must be >= 0 (0: all of them)")
    keys = sorted(keys)
    order = np.random.default_rng(seed).permutation(len(keys))
    n = len(keys) if n_examples <= 0 else min(n_examples, len(keys))
    if 0 < n_examples and len(keys) < n_examples:
        log.info("the dataset holds %d examples, fewer than the %d asked for: evaluating all", len(keys), n_examples)
    return [keys[i] for i in order[:n]]


def read_keys_file(path: str | Path) -> list[str]:
    """Keys from a JSON list, or the ``validation`` list of a training ``<name>_split.json``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"keys file {path} is not readable JSON ({exc})") from exc
    if isinstance(data, dict):
        data = data.get("validation")
    if not isinstance(data, list) or not all(isinstance(k, str) for k in data):
        raise DatasetError(f"keys file {path} must hold a JSON list of keys or a split file with 'validation'")
    return data


def evaluate_model(
    model_path: str | Path,
    dataset_path: str | Path,
    output_dir: str | Path,
    n_examples: int = 40,
    keys: Sequence[str] | None = None,
    seed: int = 0,
    model_input_shape: Sequence[int] | None = None,
    model_output_shape: Sequence[int] | None = None,
    occlusions: bool = False,
    occlusion_size: int = 40,
    visualization_interval: int = 10,
    object_threshold: float = 0.5,
    class_weights: Sequence[float] = (1.0, 5.0),
    dice_weight: float = 0.3,
    progress: Callable[[int, int], None] | None = None,
) -> EvaluationReport:
    """Evaluate a model file on examples of a prepared dataset and write the reports and plots.

    Examples are centre-cropped to the model input (default: the example size) and their masks
    to the model output.  Writes ``report.txt``, ``report.json``, ``PrecisionRecall.png``,
    ``PrecisionRecallExamples.png`` and, every ``visualization_interval``-th example,
    ``val_<n>_*.png`` into ``output_dir``.  Everything is checked (counts, output folder, dataset,
    keys, model, shapes) before the folder is created; each file is written whole.
    """
    from .training import Augmentation, ExampleLoader, weighted_cce_dice_loss
    from .training_data import ExampleLibrary, check_output_dir
    from .unet import check_tile_shapes, load_unet, read_model_weights

    t0 = time.perf_counter()
    if n_examples < 0:
        raise ParameterError(f"number of examples {n_examples} must be >= 0 (0: all of them)")
    if visualization_interval < 0:
        raise ParameterError(f"visualization interval {visualization_interval} must be >= 0 (0: no plots)")
    output_dir = check_output_dir(output_dir, "the evaluation reports")
    library = ExampleLibrary(dataset_path)
    if keys is not None:
        missing = sorted(set(keys) - set(library.keys))
        if missing:
            raise DatasetError(f"{library.path} has no examples {', '.join(missing[:5])}")
        chosen = list(keys)
        if not chosen:
            raise DatasetError("the keys list is empty")
    else:
        chosen = choose_keys(library.keys, n_examples, seed)
    weights = read_model_weights(model_path)
    in_shape = tuple(model_input_shape) if model_input_shape else library.example_shape
    in_shape, out_shape = check_tile_shapes(in_shape, None, weights.config.n_blocks)
    if model_output_shape is not None and tuple(model_output_shape) != out_shape:
        raise GeometryError(
            f"model output shape {','.join(map(str, model_output_shape))} does not match the model: input "
            f"{','.join(map(str, in_shape))} gives output {','.join(map(str, out_shape))}"
        )
    loader = ExampleLoader(
        library, chosen, in_shape, out_shape, Augmentation(affine=False, occlusions=occlusions, occlusion_size=occlusion_size)
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ("report.txt", "report.json"):  # an earlier evaluation's: the new ones mark a finished run
        (output_dir / name).unlink(missing_ok=True)

    from .inference import import_tensorflow

    tf = import_tensorflow()  # quietly (TensorFlow's C++ start-up lines), before Keras imports it
    model, _ = load_unet(model_path, input_shape=in_shape)
    loss_fn = weighted_cce_dice_loss(class_weights, dice_weight)

    @tf.function(input_signature=[tf.TensorSpec([1, *in_shape, 1], tf.float32)])
    def forward(x):
        return model(x, training=False)

    acc = EvaluationAccumulator(object_threshold=object_threshold, seed=seed)
    margin = [(i - o) // 2 for i, o in zip(in_shape, out_shape)]
    crop = tuple(slice(m, m + o) for m, o in zip(margin, out_shape))
    for n, key in enumerate(chosen):
        image, mask = loader.augmented(n, seed * 1_000_003 + n) if occlusions else loader.plain(n)
        logits = forward(image[None, ..., None])
        loss = float(loss_fn(tf.one_hot(mask[None], 2), logits)[0])
        prob = tf.nn.softmax(logits, axis=-1)[0, ..., 1].numpy()
        image_out = image[crop]
        acc.add(key, prob, mask, image_out, loss)
        if visualization_interval > 0 and (n + 1) % visualization_interval == 0:
            plot_example(n, image_out, mask.astype(np.float32), prob, output_dir)
        if progress:
            progress(n + 1, len(chosen))
    library.close()
    report = acc.report(str(library.path), str(model_path))
    report.seconds = time.perf_counter() - t0
    plot_precision_recall(report, output_dir)
    for name, text in (("report.txt", report.to_text()), ("report.json", json.dumps(report.to_dict(), indent=1))):
        tmp = output_dir / f"{name}.partial"
        tmp.write_text(text)
        os.replace(tmp, output_dir / name)
    return report
