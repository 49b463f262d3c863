"""Training the U-Net on a prepared example library (spec section 2), reproducibly and resumably.

* **Loss**: the original's weighted cross-entropy + soft dice on logits (:func:`weighted_cce_dice_loss`).
* **Metrics**: categorical accuracy (``acc``) and the mean IoU of the argmax (``meanIoU``).
* **Optimiser**: Adam (Keras defaults, learning rate 1e-3).
* **Input pipeline**: ``tf.data``; examples are read from the HDF5 library and augmented in a
  parallel ``map`` (``num_parallel_calls``).  Augmentation, in the original's order: elastic
  (off by default; sigma 4 voxels on a 5x5x5 control grid), affine (on by default; a uniform
  random rotation and a scale in [0.9, 1.1]), occlusion (off by default; one zeroed cube of
  ``occlusion_size``).  Each example's randomness comes from ``(seed, epoch, position)``, so a
  run is reproducible and a resumed run sees the same epochs it would have seen.
* **Outputs** in ``output_dir``: ``<name><epoch>.h5`` every epoch and ``<name>_best.h5`` (lowest
  ``val_loss``, or ``loss`` without validation), all in the legacy HDF5 layout that
  ``segment_volume.py`` loads; ``<name><epoch>.state.npz`` beside each checkpoint (optimizer
  variables, epoch, best value, seed) for ``resume``; ``<name>.log`` (CSV); ``<name>_split.json``
  (training and validation keys); ``loss.png``, ``accuracy.png``, ``iou.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import DatasetError, GeometryError, ModelError
from .geometry import XYZ, format_xyz
from .training_data import ExampleLibrary
from .unet import UNetConfig, check_tile_shapes

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def weighted_cce_dice_loss(
    class_weights: Sequence[float] = (1.0, 5.0), dice_weight: float = 0.3, epsilon: float = 1e-6
) -> Callable:
    """The original ``weighted_cce_dice_loss(class_weights, dice_weight)`` with ``from_logits=True``.

    With ``p = softmax(z)`` over the class axis, one-hot truth ``y``, ``W = class_weights`` and
    ``V`` the voxels of one sample ``b``::

        L_ce(b)  = (1/|V|) sum_v (sum_c W_c y_vc) * (-sum_c y_vc log p_vc)
        D_bc     = (2 sum_v p_vc y_vc + eps) / (sum_v (p_vc^2 + y_vc^2) + eps)
        L_dice   = 1 - mean_{b,c} D_bc              (background included; one value per batch)
        L(b)     = (1 - dice_weight) L_ce(b) + dice_weight L_dice

    The returned function gives ``L(b)`` per sample; Keras averages it over the batch.
    ``log p`` is computed as ``log_softmax(z)`` (exact, no clipping).
    """
    import tensorflow as tf

    weights = tf.constant(list(class_weights), dtype=tf.float32)
    lam = float(dice_weight)

    def loss(y_true, y_pred):
        y = tf.cast(y_true, tf.float32)
        z = tf.cast(y_pred, tf.float32)
        log_p = tf.nn.log_softmax(z, axis=-1)
        p = tf.exp(log_p)
        spatial = list(range(1, len(z.shape) - 1))
        voxel_weight = tf.reduce_sum(y * weights, axis=-1)
        ce = -tf.reduce_sum(y * log_p, axis=-1)
        l_ce = tf.reduce_mean(voxel_weight * ce, axis=spatial)
        numerator = 2.0 * tf.reduce_sum(p * y, axis=spatial) + epsilon
        denominator = tf.reduce_sum(p * p + y * y, axis=spatial) + epsilon
        l_dice = 1.0 - tf.reduce_mean(numerator / denominator)
        return (1.0 - lam) * l_ce + lam * l_dice

    loss.__name__ = "cce_dice"
    return loss


def training_metrics(n_classes: int = 2) -> list:
    """``acc`` (categorical accuracy) and ``meanIoU`` (mean over classes of the argmax IoU)."""
    import keras

    return [
        keras.metrics.CategoricalAccuracy(name="acc"),
        keras.metrics.MeanIoU(num_classes=n_classes, name="meanIoU", sparse_y_true=False, sparse_y_pred=False),
    ]


# --------------------------------------------------------------------------------------------
# Augmentation (numpy; one example at a time)
# --------------------------------------------------------------------------------------------


def centre_crop(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    starts = [(s - t) // 2 for s, t in zip(array.shape, shape)]
    return array[tuple(slice(a, a + t) for a, t in zip(starts, shape))]


def random_affine(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    image_shape: Sequence[int] | None = None,
    mask_shape: Sequence[int] | None = None,
    scale_range: tuple[float, float] = (0.9, 1.1),
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate uniformly in SO(3) and scale isotropically about the centre ``shape // 2``.

    ``M = s R`` maps input to output; output voxel ``o`` samples input ``c + M^-1 (o - c)`` with
    scipy's ``reflect`` (half-sample) border; trilinear for the image, nearest for the mask.
    ``image_shape`` / ``mask_shape`` compute only the centred part of the output that is kept
    (the model input and output), which is the same as transforming everything and cropping.
    """
    from scipy.ndimage import affine_transform
    from scipy.spatial.transform import Rotation

    try:
        rotation = Rotation.random(rng=rng).as_matrix()
    except TypeError:  # scipy < 1.15 names it random_state
        rotation = Rotation.random(random_state=rng).as_matrix()
    scale = rng.uniform(*scale_range)
    inverse = rotation.T / scale
    centre = np.array(image.shape) // 2
    offset = centre - inverse @ centre

    def transform(array, shape, order):
        shape = tuple(shape or array.shape)
        crop = np.array([(a - s) // 2 for a, s in zip(array.shape, shape)])
        return affine_transform(
            array, inverse, offset=offset + inverse @ crop, output_shape=shape, order=order, mode="reflect"
        )

    return transform(image, image_shape, 1), transform(mask, mask_shape, 0)


def _spline_weights(n_points: int, size: int) -> np.ndarray:
    """``(size, n_points)`` cubic-spline weights interpolating control points spread over ``size``."""
    from scipy.ndimage import map_coordinates

    positions = np.linspace(0, n_points - 1, size)[None]
    basis = np.eye(n_points)
    return np.stack([map_coordinates(b, positions, order=3, mode="mirror") for b in basis], axis=1)


def random_elastic(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    sigma: float = 4.0,
    points: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Elastic deformation like ``elasticdeform.deform_random_grid(sigma=4, points=5, order=[2, 0])``.

    Displacements at ``points**3`` control points are drawn from N(0, sigma) voxels per axis and
    interpolated with a cubic spline to every voxel; the image is resampled with an order-2
    spline without prefilter, the mask with nearest neighbour; borders reflect.
    """
    from scipy.ndimage import map_coordinates

    shape = image.shape
    coarse = rng.normal(0.0, sigma, size=(3, points, points, points))
    wx, wy, wz = (_spline_weights(points, s) for s in shape)
    dense = np.einsum("ip,jq,kr,apqr->aijk", wx, wy, wz, coarse, optimize=True).astype(np.float32)
    coords = np.indices(shape, dtype=np.float32)
    coords += dense
    del dense
    out_image = map_coordinates(image, coords, order=2, mode="reflect", prefilter=False).astype(image.dtype)
    out_mask = map_coordinates(mask, coords, order=0, mode="reflect").astype(mask.dtype)
    return out_image, out_mask


def occlude(image: np.ndarray, rng: np.random.Generator, size: int, frame: Sequence[int] | None = None) -> np.ndarray:
    """Zero one cube of edge ``size`` (in place); its corner is uniform over ``frame``.

    ``frame`` is the example's (library) shape when ``image`` is its centred crop; the cube is
    placed in library coordinates and clipped to the crop.
    """
    frame = tuple(frame or image.shape)
    if any(size > f for f in frame):
        raise GeometryError(f"occlusion size {size} is larger than the example {format_xyz(frame)}")
    offset = [(f - s) // 2 for f, s in zip(frame, image.shape)]
    corner = [int(rng.integers(0, f - size + 1)) - o for f, o in zip(frame, offset)]
    region = tuple(slice(max(c, 0), max(min(c + size, s), 0)) for c, s in zip(corner, image.shape))
    image[region] = 0
    return image


@dataclass(frozen=True)
class Augmentation:
    affine: bool = True
    elastic: bool = False
    occlusions: bool = False
    occlusion_size: int = 40
    elastic_sigma: float = 4.0
    elastic_points: int = 5
    scale_range: tuple[float, float] = (0.9, 1.1)


class ExampleLoader:
    """Reads examples and turns them into (model input, mask at model output) pairs."""

    def __init__(
        self,
        library: ExampleLibrary,
        keys: Sequence[str],
        input_shape: XYZ,
        output_shape: XYZ,
        augmentation: Augmentation = Augmentation(),
    ) -> None:
        self.library, self.keys = library, list(keys)
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)
        self.augmentation = augmentation
        frame = library.example_shape
        if augmentation.occlusions and any(augmentation.occlusion_size > f for f in frame):
            raise DatasetError(
                f"occlusion size {augmentation.occlusion_size} is larger than the examples "
                f"{format_xyz(frame)} of {library.path}"
            )
        for what, shape in (("model input", self.input_shape), ("model output", self.output_shape)):
            if any(f < s or (f - s) % 2 for f, s in zip(frame, shape)):
                raise DatasetError(
                    f"{library.path}: examples of {format_xyz(frame)} cannot be centre-cropped to the "
                    f"{what} {format_xyz(shape)} (need example >= {what} with an even difference; prepare "
                    "the dataset with matching --tile-input-shape)"
                )

    def __len__(self) -> int:
        return len(self.keys)

    def plain(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask, _ = self.library.get(self.keys[int(index)])
        return (
            np.ascontiguousarray(centre_crop(image, self.input_shape)),
            np.ascontiguousarray(centre_crop(mask, self.output_shape)),
        )

    def augmented(self, index: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        aug = self.augmentation
        rng = np.random.default_rng(int(seed))
        image, mask, _ = self.library.get(self.keys[int(index)])
        frame = image.shape
        if aug.elastic:
            image, mask = random_elastic(image, mask, rng, aug.elastic_sigma, aug.elastic_points)
        if aug.affine:
            image, mask = random_affine(image, mask, rng, self.input_shape, self.output_shape, aug.scale_range)
        else:
            image, mask = centre_crop(image, self.input_shape), centre_crop(mask, self.output_shape)
        image = np.array(image, dtype=np.float32)  # a writable copy
        if aug.occlusions:
            occlude(image, rng, aug.occlusion_size, frame)
        return image, np.ascontiguousarray(mask, dtype=np.int32)


def epoch_plan(n: int, batch_size: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Example order and per-example augmentation seeds of one epoch (0-based).

    Every example once, in a random order, topped up with random repeats to whole batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    extra = (-n) % batch_size
    if extra:
        order = np.concatenate([order, rng.choice(n, extra, replace=n < extra)])
    return order, rng.integers(0, 2**62, size=len(order))


def _as_tensors(tf, loader: ExampleLoader, n_classes: int):
    def finish(image, mask):
        image.set_shape(loader.input_shape)
        mask.set_shape(loader.output_shape)
        return image[..., None], tf.one_hot(mask, n_classes, dtype=tf.float32)

    return finish


def training_dataset(
    loader: ExampleLoader,
    batch_size: int,
    seed: int,
    start_epoch: int = 0,
    parallel_calls: int | None = None,
    n_classes: int = 2,
):
    """An endless ``tf.data.Dataset`` of augmented ``(image, one-hot mask)`` batches from ``start_epoch``.

    ``parallel_calls`` examples are read and augmented at once (None: ``tf.data.AUTOTUNE``).
    """
    import tensorflow as tf

    n = len(loader)

    def plan():
        epoch = start_epoch
        while True:
            order, seeds = epoch_plan(n, batch_size, seed, epoch)
            yield from zip(order.tolist(), seeds.tolist())
            epoch += 1

    def load(index, example_seed):
        return loader.augmented(int(index), int(example_seed))

    ds = tf.data.Dataset.from_generator(
        plan, output_signature=(tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.int64))
    )
    ds = ds.map(
        lambda i, s: tuple(tf.numpy_function(load, [i, s], (tf.float32, tf.int32), stateful=False)),
        num_parallel_calls=parallel_calls or tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.map(_as_tensors(tf, loader, n_classes))
    return ds.batch(batch_size, drop_remainder=True).prefetch(2)


def validation_dataset(loader: ExampleLoader, batch_size: int, parallel_calls: int | None = None, n_classes: int = 2):
    """A finite dataset of the validation examples, unaugmented, in key order."""
    import tensorflow as tf

    def load(index):
        return loader.plain(int(index))

    ds = tf.data.Dataset.range(len(loader))
    ds = ds.map(
        lambda i: tuple(tf.numpy_function(load, [i], (tf.float32, tf.int32), stateful=False)),
        num_parallel_calls=parallel_calls or tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.map(_as_tensors(tf, loader, n_classes))
    return ds.batch(batch_size).prefetch(2)


def split_keys(keys: Sequence[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle (seeded) and split into training and validation keys.

    ``n_val = ceil(test_fraction * N)`` as in the original, but at least one example stays for
    training, and a fraction of 0 (or a single example) gives no validation set.
    """
    keys = sorted(keys)
    if not keys:
        raise DatasetError("the training dataset holds no examples")
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"test fraction {test_fraction} must be in [0, 1)")
    order = np.random.default_rng([seed, 1]).permutation(len(keys))
    shuffled = [keys[i] for i in order]
    n_val = min(math.ceil(test_fraction * len(keys)), len(keys) - 1) if test_fraction > 0 else 0
    if test_fraction > 0 and n_val == 0:
        log.warning("only %d example: no validation set (test fraction %g needs at least 2)", len(keys), test_fraction)
    return shuffled[: len(keys) - n_val], shuffled[len(keys) - n_val :]


# --------------------------------------------------------------------------------------------
# Checkpoints and resume state
# --------------------------------------------------------------------------------------------


def state_path(checkpoint: str | Path) -> Path:
    """``<name><epoch>.h5`` -> ``<name><epoch>.state.npz``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".state.npz")


def save_training_state(path: str | Path, optimizer, info: dict) -> None:
    """Optimizer variables (in order) and run info (epoch, best value, seed, ...) as ``.npz``."""
    path = Path(path)
    arrays = {f"var{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
    names = np.array([v.path for v in optimizer.variables])
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, names=names, info=np.array(json.dumps(info)), **arrays)
    tmp.replace(path)


def load_training_state(path: str | Path) -> tuple[list[np.ndarray], list[str], dict]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [str(n) for n in data["names"]]
            values = [data[f"var{i}"] for i in range(len(names))]
            info = json.loads(str(data["info"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"training state {path} is unreadable ({exc})") from exc
    return values, names, info


def restore_optimizer(optimizer, trainable_variables, values: list[np.ndarray], names: list[str], path: Path) -> None:
    """Build ``optimizer`` for the model and assign the saved variables (checked by count and shape)."""
    optimizer.build(trainable_variables)
    variables = optimizer.variables
    if len(variables) != len(values):
        raise ModelError(
            f"training state {path} holds {len(values)} optimizer variables, this model's optimizer has "
            f"{len(variables)}; was it saved for another architecture?"
        )
    for var, value, name in zip(variables, values, names):
        if tuple(var.shape) != tuple(value.shape):
            raise ModelError(
                f"training state {path}: optimizer variable {name} has shape {value.shape}, "
                f"expected {tuple(var.shape)} ({var.path})"
            )
        if name.endswith("learning_rate"):
            continue  # the learning rate of this run wins
        var.assign(value)


def latest_checkpoint(output_dir: str | Path, model_name: str) -> Path | None:
    """The highest-numbered ``<model_name><epoch>.h5`` in ``output_dir``."""
    pattern = re.compile(re.escape(model_name) + r"(\d+)\.h5$")
    found = []
    for p in Path(output_dir).glob(f"{model_name}*.h5"):
        m = pattern.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingConfig:
    """Settings of one training run (the CLI flags of ``train_unet.py``)."""

    epochs: int = 10
    batch_size: int = 1
    test_fraction: float = 0.2
    object_class_weight: float = 5.0
    dice_weight: float = 0.3
    learning_rate: float = 1e-3
    input_shape: XYZ = (220, 220, 220)
    output_shape: XYZ | None = (132, 132, 132)
    library_size: XYZ | None = None
    augmentation: Augmentation = field(default_factory=Augmentation)
    seed: int | None = None
    parallel_calls: int | None = None
    steps_per_epoch: int | None = None
    model_name: str = "resumed"
    verbose: int = 2


@dataclass
class TrainingResult:
    output_dir: Path
    model_name: str
    first_epoch: int
    last_epoch: int
    n_train: int
    n_val: int
    monitor: str
    best_value: float
    best_epoch: int
    seed: int
    seconds: float
    history: dict[str, list[float]]

    @property
    def best_path(self) -> Path:
        return self.output_dir / f"{self.model_name}_best.h5"

    def checkpoint(self, epoch: int) -> Path:
        return self.output_dir / f"{self.model_name}{epoch}.h5"

    def summary(self) -> str:
        return (
            f"trained {self.model_name} epochs {self.first_epoch}-{self.last_epoch} on {self.n_train} examples "
            f"({self.n_val} validation): best {self.monitor} {self.best_value:.4g} at epoch {self.best_epoch} "
            f"-> {self.best_path}; seed {self.seed}; {self.seconds:.1f} s"
        )


def _trim_log(path: Path, before_epoch: int) -> None:
    """Drop CSV rows of epochs >= ``before_epoch`` (0-based), left by a run resumed from earlier."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < before_epoch]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(kept)


def read_log(path: str | Path) -> dict[str, list[float]]:
    """The CSV training log as columns (``epoch`` is 0-based, as Keras writes it)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows if r.get(k) not in (None, "")] for k in (rows[0].keys() if rows else [])}


def plot_history(history: dict[str, list[float]], output_dir: str | Path) -> list[Path]:
    """``loss.png``, ``accuracy.png`` and ``iou.png`` (training and validation curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    epochs = [e + 1 for e in history.get("epoch", [])]
    written = []
    for key, label, name in (
        ("loss", "loss (weighted cross-entropy + dice)", "loss.png"),
        ("acc", "pixel accuracy", "accuracy.png"),
        ("meanIoU", "mean IoU", "iou.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, style in ((key, "-o"), (f"val_{key}", "--s")):
            if history.get(k):
                ax.plot(epochs[: len(history[k])], history[k], style, label=k, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir / name, dpi=80)
        plt.close(fig)
        written.append(output_dir / name)
    return written


def write_samples(loader: ExampleLoader, output_dir: Path, seed: int, n: int = 3) -> None:
    """``sample<i>.png``: the middle slices of ``n`` augmented training examples and their masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order, seeds = epoch_plan(len(loader), 1, seed, 0)
    for i in range(min(n, len(loader))):
        image, mask = loader.augmented(int(order[i]), int(seeds[i]))
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        axes[0].imshow(image[:, :, image.shape[2] // 2], cmap="gray", vmin=0, vmax=1)
        axes[0].set_title(f"{loader.keys[int(order[i])]} input")
        axes[1].imshow(mask[:, :, mask.shape[2] // 2], vmin=0, vmax=1)
        axes[1].set_title("mask (model output area)")
        fig.tight_layout()
        fig.savefig(output_dir / f"sample{i}.png", dpi=80)
        plt.close(fig)


def train(
    dataset_path: str | Path,
    output_dir: str | Path,
    unet_config: UNetConfig = UNetConfig(),
    config: TrainingConfig = TrainingConfig(),
    resume_from: str | Path | None = None,
    visualization_sample: bool = False,
    callbacks: Sequence[Any] = (),
) -> TrainingResult:
    """Train (or resume training) the U-Net on a prepared dataset; see the module docstring.

    Args:
        dataset_path: the HDF5 example library from :func:`~.training_data.prepare_dataset`.
        output_dir: checkpoints, log, split and plots (created).
        unet_config: architecture of a new model; ignored (with a warning when it differs) when
            resuming, since the checkpoint's architecture wins.
        config: the run's settings; ``config.epochs`` epochs are trained, numbered after the
            resumed checkpoint's epoch.
        resume_from: a checkpoint to continue.  Its ``.state.npz`` sidecar restores the optimizer
            state, epoch count, best value and seed; without one (e.g. the published model) the
            weights are used with a fresh optimizer from epoch 0.

    Returns:
        A :class:`TrainingResult`.
    """
    import keras

    from .unet import build_unet, load_unet, save_unet

    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = config.model_name
    if not name or "/" in name:
        raise DatasetError(f"model name {name!r} must be a non-empty file-name prefix")
    if config.epochs < 1 or config.batch_size < 1:
        raise DatasetError(f"epochs ({config.epochs}) and batch size ({config.batch_size}) must be >= 1")

    library = ExampleLibrary(dataset_path)
    if config.library_size is not None and tuple(config.library_size) != library.example_shape:
        raise DatasetError(
            f"--library_size {format_xyz(config.library_size)} does not match the examples in "
            f"{library.path}, which are {format_xyz(library.example_shape)}"
        )

    # --- resume state ---
    initial_epoch, best_value, best_epoch, state, seed = 0, math.inf, 0, None, config.seed
    if resume_from is not None:
        resume_from = Path(resume_from)
        sidecar = state_path(resume_from)
        if sidecar.is_file():
            values, names, info = load_training_state(sidecar)
            state = (values, names, sidecar)
            initial_epoch = int(info["epoch"])
            best_value = float(info.get("best_value", math.inf))
            best_epoch = int(info.get("best_epoch", 0))
            if seed is None:
                seed = info.get("seed")
            log.info("resuming from %s at epoch %d (optimizer state from %s)", resume_from, initial_epoch, sidecar)
        else:
            log.warning(
                "no training state %s next to %s: resuming its weights with a fresh optimizer from epoch 0",
                sidecar, resume_from,
            )
    seed = int(seed) if seed is not None else secrets.randbits(31)
    keras.utils.set_random_seed(seed + initial_epoch)

    # --- model ---
    if resume_from is not None:
        model, weights = load_unet(resume_from, input_shape=config.input_shape)
        if weights.config != unet_config:
            log.warning(
                "using the architecture of %s (%s), not the one given (%s)", resume_from, weights.config, unet_config
            )
        unet_config = weights.config
    else:
        model = build_unet(config.input_shape, unet_config)
    input_shape, output_shape = check_tile_shapes(config.input_shape, config.output_shape, unet_config.n_blocks)

    # --- data ---
    split_file = output_dir / f"{name}_split.json"
    if resume_from is not None and split_file.is_file():
        split = json.loads(split_file.read_text())
        train_keys, val_keys = split["training"], split["validation"]
        missing = sorted(set(train_keys + val_keys) - set(library.keys))
        if missing:
            raise DatasetError(f"{split_file} names examples not in {library.path}: {', '.join(missing[:5])}")
    else:
        train_keys, val_keys = split_keys(library.keys, config.test_fraction, seed)
        split_file.write_text(json.dumps({"seed": seed, "training": train_keys, "validation": val_keys}, indent=1))
    train_loader = ExampleLoader(library, train_keys, input_shape, output_shape, config.augmentation)
    val_loader = ExampleLoader(library, val_keys, input_shape, output_shape) if val_keys else None
    steps = config.steps_per_epoch or math.ceil(len(train_keys) / config.batch_size)
    train_ds = training_dataset(train_loader, config.batch_size, seed, initial_epoch, config.parallel_calls)
    val_ds = validation_dataset(val_loader, config.batch_size, config.parallel_calls) if val_loader else None
    if visualization_sample:
        write_samples(train_loader, output_dir, seed)

    # --- compile, restore optimizer ---
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    model.compile(
        optimizer=optimizer,
        loss=weighted_cce_dice_loss((1.0, config.object_class_weight), config.dice_weight),
        metrics=training_metrics(unet_config.n_classes),
    )
    if state is not None:
        restore_optimizer(optimizer, model.trainable_variables, *state)

    monitor = "val_loss" if val_ds is not None else "loss"
    log_path = output_dir / f"{name}.log"
    if initial_epoch > 0:
        _trim_log(log_path, initial_epoch)
    else:
        log_path.unlink(missing_ok=True)
    info_base = {"seed": seed, "monitor": monitor, "unet_config": asdict(unet_config), "dataset": str(library.path)}
    best = {"value": best_value, "epoch": best_epoch}

    class Checkpoints(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            n = epoch + 1
            value = float(logs.get(monitor, math.nan))
            if math.isfinite(value) and value < best["value"]:
                best.update(value=value, epoch=n)
                save_unet(self.model, output_dir / f"{name}_best.h5", unet_config)
            path = output_dir / f"{name}{n}.h5"
            save_unet(self.model, path, unet_config)
            info = {**info_base, "epoch": n, "best_value": best["value"], "best_epoch": best["epoch"]}
            save_training_state(state_path(path), self.model.optimizer, info)

    log.info(
        "training %s: %d training / %d validation examples, %d steps per epoch, epochs %d-%d, seed %d",
        name, len(train_keys), len(val_keys), steps, initial_epoch + 1, initial_epoch + config.epochs, seed,
    )
    model.fit(
        train_ds,
        epochs=initial_epoch + config.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        validation_data=val_ds,
        verbose=config.verbose,
        shuffle=False,  # the dataset is shuffled (seeded) by epoch_plan
        callbacks=[Checkpoints(), keras.callbacks.CSVLogger(str(log_path), append=initial_epoch > 0), *callbacks],
    )
    library.close()
    history = read_log(log_path)
    plot_history(history, output_dir)
    return TrainingResult(
        output_dir=output_dir,
        model_name=name,
        first_epoch=initial_epoch + 1,
        last_epoch=initial_epoch + config.epochs,
        n_train=len(train_keys),
        n_val=len(val_keys),
        monitor=monitor,
        best_value=best["value"],
        best_epoch=best["epoch"],
        seed=seed,
        seconds=time.perf_counter() - t0,
        history=history,
    )
