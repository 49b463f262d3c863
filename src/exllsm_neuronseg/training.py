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
* **Outputs** in ``output_dir``, all written every epoch: ``<name><epoch>.h5`` and
  ``<name>_best.h5`` (lowest ``val_loss``, or ``loss`` without validation), in the legacy HDF5
  layout that ``segment_volume.py`` loads; ``<name><epoch>.state.npz`` beside each checkpoint
  (optimizer variables, the dropout layers' generator states, epoch, best value, seed, split,
  history and the weights' SHA-256); ``<name>.log`` (CSV); ``<name>_split.json`` (training and
  validation keys); ``loss.png``, ``accuracy.png``, ``iou.png``.
* **Resume is exact**: a checkpoint and its state are committed together
  (:func:`commit_checkpoint`), and a run resumed from one continues bit for bit as the
  uninterrupted run would have, dropout included (same machine and settings).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import testhook
from .errors import DatasetError, GeometryError, ModelError, OutputExistsError, ParameterError
from .geometry import XYZ, format_xyz
from .training_data import ExampleLibrary, check_output_dir
from .unet import UNetConfig, check_tile_shapes, read_model_weights

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


def epoch_plan(n: int, batch_size: int, seed: int, epoch: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Example order and per-example augmentation seeds of one epoch (0-based).

    Every example once, in a random order, topped up with random repeats to whole batches.
    ``length`` (steps per epoch x batch size, when set apart from one pass) cuts that short or
    continues it with further seeded permutations, so that each epoch depends on its number only.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    extra = (-n) % batch_size
    if extra:
        order = np.concatenate([order, rng.choice(n, extra, replace=n < extra)])
    seeds = rng.integers(0, 2**62, size=len(order))
    if length is None or length == len(order):
        return order, seeds
    orders, all_seeds = [order], [seeds]
    while sum(map(len, orders)) < length:
        more = np.random.default_rng([seed, epoch, len(orders)])
        orders.append(more.permutation(n))
        all_seeds.append(more.integers(0, 2**62, size=n))
    return np.concatenate(orders)[:length], np.concatenate(all_seeds)[:length]


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
    steps_per_epoch: int | None = None,
):
    """An endless ``tf.data.Dataset`` of augmented ``(image, one-hot mask)`` batches from ``start_epoch``.

    ``parallel_calls`` examples are read and augmented at once (None: ``tf.data.AUTOTUNE``).
    With ``steps_per_epoch`` every epoch is exactly that many batches of its own plan.
    """
    import tensorflow as tf

    n = len(loader)
    length = steps_per_epoch * batch_size if steps_per_epoch else None

    def plan():
        epoch = start_epoch
        while True:
            order, seeds = epoch_plan(n, batch_size, seed, epoch, length)
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

STATE_FORMAT = 2  # training states with the weights' checksum, the run id, the history and the generators
BEST_ATTRIBUTE = "exllsm_training"  # on <name>_best.h5: {"run_id", "epoch", "value", "monitor"}


def state_path(checkpoint: str | Path) -> Path:
    """``<name><epoch>.h5`` -> ``<name><epoch>.state.npz``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".state.npz")


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_training_state(path: str | Path, optimizer, info: dict, model=None) -> None:
    """Optimizer variables (in order), the model's non-trainable variables (the dropout layers'
    generator states) and run info as ``.npz``; written under a temporary name, then renamed."""
    path = Path(path)
    arrays = {f"var{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
    arrays["names"] = np.array([v.path for v in optimizer.variables])
    if model is not None:
        variables = model.non_trainable_variables
        arrays.update({f"model_var{i}": np.asarray(v.numpy()) for i, v in enumerate(variables)})
        arrays["model_names"] = np.array([v.path for v in variables], dtype=str)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, info=np.array(json.dumps(info)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_training_state(path: str | Path) -> tuple[list[np.ndarray], list[str], dict]:
    """``(optimizer values, their names, run info)`` of a ``.state.npz``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [str(n) for n in data["names"]]
            values = [data[f"var{i}"] for i in range(len(names))]
            info = json.loads(str(data["info"]))
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise ModelError(f"training state {path} is unreadable ({exc})") from exc
    return values, names, info


def load_model_state(path: str | Path) -> tuple[list[np.ndarray], list[str]]:
    """The model's non-trainable variables (the generator states) saved in a ``.state.npz``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [str(n) for n in data["model_names"]] if "model_names" in data else []
            return [data[f"model_var{i}"] for i in range(len(names))], names
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise ModelError(f"training state {path} is unreadable ({exc})") from exc


def _assign(variables, values: list[np.ndarray], names: list[str], path: Path, what: str, skip=lambda name: False) -> None:
    if len(variables) != len(values):
        raise ModelError(
            f"training state {path} holds {len(values)} {what} variables, this model has {len(variables)}; "
            "was it saved for another architecture?"
        )
    for var, value, name in zip(variables, values, names):
        if tuple(var.shape) != tuple(value.shape):
            raise ModelError(
                f"training state {path}: {what} variable {name} has shape {value.shape}, expected "
                f"{tuple(var.shape)} ({var.path})"
            )
        if not skip(name):
            var.assign(value)


def restore_optimizer(optimizer, trainable_variables, values: list[np.ndarray], names: list[str], path: Path) -> None:
    """Build ``optimizer`` for the model and assign the saved variables (checked by count and shape);
    the learning rate of this run wins."""
    optimizer.build(trainable_variables)
    _assign(optimizer.variables, values, names, path, "optimizer", skip=lambda name: name.endswith("learning_rate"))


def restore_model_state(model, path: Path) -> None:
    """Assign the saved non-trainable variables: the dropout generators continue where they stopped."""
    values, names = load_model_state(path)
    _assign(model.non_trainable_variables, values, names, path, "model (generator state)")


@dataclass(frozen=True)
class CheckpointStatus:
    """A checkpoint ``<name><epoch>.h5`` and whether it can be resumed (``problem`` None)."""

    path: Path
    epoch: int
    info: dict | None = None
    problem: str | None = None

    @property
    def complete(self) -> bool:
        return self.problem is None


def inspect_checkpoint(path: str | Path, epoch: int | None = None) -> CheckpointStatus:
    """Whether ``path`` and its ``.state.npz`` form a complete checkpoint: both present, the state
    of this version and recording exactly these weights (their SHA-256)."""
    path = Path(path)
    sidecar = state_path(path)
    if not path.is_file():
        return CheckpointStatus(path, epoch or 0, None, "its weights file is missing (a run killed while writing it)")
    if not sidecar.is_file():
        return CheckpointStatus(path, epoch or 0, None, "it has no training state beside it (a run killed while writing it?)")
    try:
        _, _, info = load_training_state(sidecar)
    except ModelError as exc:
        return CheckpointStatus(path, epoch or 0, None, str(exc))
    epoch = int(info.get("epoch", epoch or 0))
    if info.get("format") != STATE_FORMAT:
        return CheckpointStatus(path, epoch, None, "its training state was written by an older version (no checksum of the weights)")
    if info.get("weights_sha256") != file_sha256(path):
        return CheckpointStatus(path, epoch, None, "its training state records other weights (a run killed between writing the two)")
    return CheckpointStatus(path, epoch, info)


def list_checkpoints(output_dir: str | Path, model_name: str) -> list[CheckpointStatus]:
    """Every ``<model_name><epoch>.h5`` (or lone ``.state.npz``) in ``output_dir``, by epoch."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    pattern = re.compile(re.escape(model_name) + r"(\d+)\.(?:h5|state\.npz)$")
    epochs = sorted({int(m.group(1)) for p in output_dir.iterdir() if (m := pattern.match(p.name))})
    found = []
    for epoch in epochs:
        status = inspect_checkpoint(output_dir / f"{model_name}{epoch}.h5", epoch)
        if status.info is not None and (status.info.get("model_name") != model_name or status.epoch != epoch):
            continue  # another name's checkpoint ("m1" epoch 2 is "m12.h5", as "m" epoch 12)
        found.append(status)
    return found


def latest_checkpoint(output_dir: str | Path, model_name: str) -> Path | None:
    """The newest complete checkpoint ``<model_name><epoch>.h5`` in ``output_dir``."""
    complete = [c for c in list_checkpoints(output_dir, model_name) if c.complete]
    return complete[-1].path if complete else None


def best_model_info(path: str | Path) -> dict | None:
    """What ``<name>_best.h5`` records of its run (``run_id``, ``epoch``, ``value``, ``monitor``)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return json.loads(str(h5.attrs[BEST_ATTRIBUTE]))
    except (OSError, KeyError, ValueError):
        return None


def run_files(output_dir: str | Path, model_name: str) -> list[Path]:
    """The files of a training run named ``model_name``: checkpoints, states, best model, log, split."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    pattern = re.compile(re.escape(model_name) + r"(?:\d+\.h5|\d+\.state\.npz|_best\.h5|\.log|_split\.json)$")
    return sorted(p for p in output_dir.iterdir() if pattern.match(p.name))


def _some(paths: Sequence[Path], n: int = 4) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


@dataclass
class RunStart:
    """Where a training run starts: epoch, weights, resume state, best value so far."""

    epoch: int = 0
    checkpoint: Path | None = None  # resumed with its training state
    weights: Path | None = None  # the weights it starts from (a checkpoint, or a model to fine-tune)
    info: dict | None = None  # the checkpoint's run info
    best_value: float = math.inf
    best_epoch: int = 0
    replace: list[Path] = field(default_factory=list)  # an earlier run's files, removed before training


def plan_start(
    output_dir: str | Path,
    model_name: str,
    resume: bool = False,
    resume_from: str | Path | None = None,
    overwrite: bool = False,
) -> RunStart:
    """Decide where a run starts, reading files only (nothing is written or imported).

    * ``resume_from`` with a complete training state: that checkpoint, exactly.
    * ``resume`` alone: the newest complete checkpoint of ``model_name`` in ``output_dir``
      (incomplete newer ones are named and trained again); :class:`ModelError` when there is none.
    * ``resume_from`` without a training state (e.g. the published model): its weights, a fresh
      optimizer, epoch 0 (fine-tuning).
    * Otherwise a new run.

    A resumed run never overwrites what it does not continue: a later complete checkpoint of its
    run, or another run's checkpoints or best model, are refused (:class:`OutputExistsError`); its
    best value continues from what ``<name>_best.h5`` records.  A new run into ``output_dir``
    where a run of ``model_name`` exists (checkpoints, best model, log) is refused unless
    ``overwrite`` (which replaces that run's files).
    """
    output_dir = Path(output_dir)
    statuses = list_checkpoints(output_dir, model_name)
    complete = [c for c in statuses if c.complete]
    newest = (
        f"resuming without a checkpoint continues the newest complete one, {complete[-1].path.name}"
        if complete
        else f"no checkpoint of {model_name} there is complete"
    )
    if resume_from is None and resume:
        if not complete:
            found = "; ".join(f"{c.path.name}: {c.problem}" for c in statuses[-3:])
            raise ModelError(
                f"nothing to resume in {output_dir}: no complete checkpoint {model_name}<epoch>.h5 with its training "
                f"state ({found or 'none there'}); start a new run, or give the checkpoint to resume"
            )
        resume_from = complete[-1].path
        for c in statuses:
            if c.epoch > complete[-1].epoch:
                log.warning(
                    "warning: %s is incomplete (%s): resuming from %s, so epoch %d is trained again",
                    c.path.name, c.problem, resume_from.name, c.epoch,
                )
    existing = run_files(output_dir, model_name)
    if resume_from is None:
        weights = None
    else:
        resume_from = Path(resume_from)
        if not resume_from.is_file():
            raise ModelError(f"the checkpoint or model to start from, {resume_from}, does not exist")
        if state_path(resume_from).is_file():
            status = inspect_checkpoint(resume_from)
            if not status.complete:
                raise ModelError(f"{resume_from} cannot be resumed: {status.problem}; {newest}")
            start = RunStart(status.epoch, resume_from, resume_from, status.info)
            _check_resume_target(output_dir, model_name, start, complete)
            return start
        if resume_from.resolve().parent == output_dir.resolve() and re.fullmatch(
            re.escape(model_name) + r"\d+\.h5", resume_from.name
        ):
            raise ModelError(
                f"{resume_from} cannot be resumed: it has no training state beside it (a run killed while "
                f"writing it?); {newest}"
            )
        log.info("fine-tuning the weights of %s: it has no training state beside it, so a fresh optimizer from epoch 1", resume_from)
        weights = resume_from
    trained = [p for p in existing if not p.name.endswith("_split.json")]  # a split alone holds no training
    if trained and not overwrite:
        raise OutputExistsError(
            f"{output_dir} already holds a training run named {model_name} ({_some(trained)}): resume it, "
            "replace it (overwrite), or choose another model name or output folder"
        )
    keep = weights.resolve() if weights is not None else None
    return RunStart(weights=weights, replace=[p for p in existing if p.resolve() != keep])


def _check_resume_target(output_dir: Path, model_name: str, start: RunStart, complete: list[CheckpointStatus]) -> None:
    """Refuse a resume that would overwrite what it does not continue; set the best value so far."""
    info = start.info or {}
    run_id, epoch = info.get("run_id"), start.epoch
    where = f"{output_dir} (model name {model_name})"
    alternatives = "write to another output folder or model name"
    others = [c.path.name for c in complete if c.info and c.info.get("run_id") != run_id]
    if others:
        raise OutputExistsError(f"{where} holds checkpoints of another run ({', '.join(others[:3])}): {alternatives}")
    later = [c for c in complete if c.epoch > epoch]
    if later:
        raise OutputExistsError(
            f"resuming {start.checkpoint} at epoch {epoch} would overwrite epochs {epoch + 1}-{later[-1].epoch} of this "
            f"run in {where}: resume from {later[-1].path.name}, or {alternatives}"
        )
    best = output_dir / f"{model_name}_best.h5"
    if best.exists():
        recorded = best_model_info(best)
        if recorded is None or recorded.get("run_id") != run_id:
            raise OutputExistsError(f"{best} belongs to another run and would be overwritten: {alternatives}")
        start.best_value, start.best_epoch = float(recorded["value"]), int(recorded["epoch"])
    log_path = output_dir / f"{model_name}.log"
    if log_path.is_file():
        rows = read_log(log_path).get("epoch", [])
        if len(rows) > epoch:  # epochs whose checkpoints are incomplete (later complete ones are refused above)
            log.warning(
                "warning: %s holds %d epochs, %s has %d: epochs %d-%d are trained again and their rows replaced",
                log_path.name, len(rows), start.checkpoint.name if start.checkpoint else "the checkpoint", epoch,
                epoch + 1, len(rows),
            )


def _remove_partials(output_dir: Path, model_name: str) -> None:
    """Temporary files a killed run of this name left (``*.partial``)."""
    pattern = re.compile(re.escape(model_name) + r"(?:\d+|_best)\.(?:h5|state\.npz)(?:\.partial)+$")
    for p in output_dir.iterdir():
        if pattern.match(p.name) or p.name in {f"{model_name}.log.partial", f"{model_name}_split.json.partial"}:
            p.unlink(missing_ok=True)


def _save_model(model, path: Path, unet_config: UNetConfig, attributes: dict | None = None) -> Path:
    """The model in the legacy layout at ``<path>.partial`` (plus ``attributes``), flushed to disk."""
    import h5py

    from .unet import save_unet

    tmp = path.with_name(path.name + ".partial")
    save_unet(model, tmp, unet_config)
    if attributes:
        with h5py.File(tmp, "a") as h5:
            for key, value in attributes.items():
                h5.attrs[key] = json.dumps(value)
    _fsync(tmp)
    return tmp


def commit_checkpoint(model, path: Path, unet_config: UNetConfig, info: dict, moment: str = "") -> None:
    """Write ``<name><epoch>.h5`` and its ``.state.npz`` so that a kill at any moment leaves either
    the complete pair or one that :func:`inspect_checkpoint` calls incomplete.

    Weights go to a temporary file; the state, which records the weights' SHA-256, is renamed into
    place; then the weights are: their rename commits the checkpoint.
    """
    tmp = _save_model(model, path, unet_config)
    info = {**info, "weights_sha256": file_sha256(tmp)}
    testhook.checkpoint(f"{moment}weights-written")
    save_training_state(state_path(path), model.optimizer, info, model)
    testhook.checkpoint(f"{moment}state-committed")
    os.replace(tmp, path)
    testhook.checkpoint(f"{moment}checkpoint-committed")


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

    def settings(self) -> dict:
        """What makes a resumed run continue exactly as an uninterrupted one would have."""
        return {
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "object_class_weight": self.object_class_weight,
            "dice_weight": self.dice_weight,
            "learning_rate": self.learning_rate,
            "input_shape": list(self.input_shape),
            "augmentation": asdict(self.augmentation),
        }


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


def write_log(path: Path, rows: Sequence[dict]) -> None:
    """The CSV training log (``epoch`` 0-based, then the metrics sorted, as Keras' CSVLogger), whole."""
    keys = sorted({k for r in rows for k in r} - {"epoch"})
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", *keys])
        for r in rows:
            writer.writerow([int(r["epoch"]), *(r.get(k, "") for k in keys)])
    os.replace(tmp, path)


def read_log(path: str | Path) -> dict[str, list[float]]:
    """The CSV training log as columns (``epoch`` is 0-based, as Keras writes it)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows if r.get(k) not in (None, "")] for k in (rows[0].keys() if rows else [])}


def _columns(rows: Sequence[dict]) -> dict[str, list[float]]:
    keys = sorted({k for r in rows for k in r})
    return {k: [float(r[k]) for r in rows if k in r] for k in keys}


def plot_history(history: dict[str, list[float]], output_dir: str | Path) -> list[Path]:
    """``loss.png``, ``accuracy.png`` and ``iou.png`` (training and validation curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .training_data import save_figure

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
        try:
            save_figure(fig, output_dir / name)
        finally:
            plt.close(fig)
        written.append(output_dir / name)
    return written


def write_samples(loader: ExampleLoader, output_dir: Path, seed: int, n: int = 3) -> None:
    """``sample<i>.png``: the middle slices of ``n`` augmented training examples and their masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .training_data import save_figure

    order, seeds = epoch_plan(len(loader), 1, seed, 0)
    for i in range(min(n, len(loader))):
        image, mask = loader.augmented(int(order[i]), int(seeds[i]))
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        axes[0].imshow(image[:, :, image.shape[2] // 2], cmap="gray", vmin=0, vmax=1)
        axes[0].set_title(f"{loader.keys[int(order[i])]} input")
        axes[1].imshow(mask[:, :, mask.shape[2] // 2], vmin=0, vmax=1)
        axes[1].set_title("mask (model output area)")
        fig.tight_layout()
        try:
            save_figure(fig, output_dir / f"sample{i}.png")
        finally:
            plt.close(fig)


def train(
    dataset_path: str | Path,
    output_dir: str | Path,
    unet_config: UNetConfig = UNetConfig(),
    config: TrainingConfig = TrainingConfig(),
    resume_from: str | Path | None = None,
    visualization_sample: bool = False,
    callbacks: Sequence[Any] = (),
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> TrainingResult:
    """Train (or resume training) the U-Net on a prepared dataset; see the module docstring.

    Everything is checked before anything is written (the dataset, the output folder, where the
    run starts: :func:`plan_start`); TensorFlow is imported only then.

    Args:
        dataset_path: the HDF5 example library from :func:`~.training_data.prepare_dataset`.
        output_dir: checkpoints, log, split and plots (created).
        unet_config: architecture of a new model; ignored (with a warning when it differs) when
            starting from a checkpoint or model, whose architecture wins.
        config: the run's settings; ``config.epochs`` epochs are trained, numbered after the
            resumed checkpoint's epoch.
        resume_from: a checkpoint to continue (its complete ``.state.npz`` restores optimizer,
            generator states, epoch, best value, seed, split and history), or a model without
            a state to fine-tune (a fresh optimizer from epoch 0).
        resume: without ``resume_from``: continue the newest complete checkpoint in ``output_dir``.
        overwrite: a new run may replace an earlier run of the same model name in ``output_dir``.
        progress: called with (steps done, steps in this run) after every step.

    Returns:
        A :class:`TrainingResult`.
    """
    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    name = config.model_name
    if not name or "/" in name or name != name.strip():
        raise ParameterError(f"model name {name!r} must be a non-empty file-name prefix")
    if config.epochs < 1 or config.batch_size < 1:
        raise ParameterError(f"epochs ({config.epochs}) and batch size ({config.batch_size}) must be >= 1")
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise ParameterError(f"steps per epoch {config.steps_per_epoch} must be >= 1")
    check_output_dir(output_dir, "the training outputs")
    library = ExampleLibrary(dataset_path)
    if config.library_size is not None and tuple(config.library_size) != library.example_shape:
        raise DatasetError(
            f"library size {format_xyz(config.library_size)} does not match the examples in "
            f"{library.path}, which are {format_xyz(library.example_shape)}"
        )
    start = plan_start(output_dir, name, resume, resume_from, overwrite)
    info = start.info
    if info is not None:
        seed = int(info["seed"])
        if config.seed is not None and config.seed != seed:
            log.warning("warning: seed %d ignored: the resumed run keeps its seed %d", config.seed, seed)
        settings = json.loads(json.dumps(config.settings()))
        changed = [k for k, v in settings.items() if info["settings"].get(k) != v]
        if changed:
            log.warning(
                "warning: resumed with other settings than the run had (%s): the result differs from an "
                "uninterrupted run", ", ".join(changed),
            )
    else:
        seed = int(config.seed) if config.seed is not None else secrets.randbits(31)
    if start.weights is not None:
        weights = read_model_weights(start.weights)
        if weights.config != unet_config:
            log.warning(
                "warning: using the architecture of %s (%s), not the one given (%s)", start.weights, weights.config, unet_config
            )
        unet_config = weights.config
    input_shape, output_shape = check_tile_shapes(config.input_shape, config.output_shape, unet_config.n_blocks)
    if info is not None:
        train_keys, val_keys = list(info["training"]), list(info["validation"])
        missing = sorted(set(train_keys + val_keys) - set(library.keys))
        if missing:
            raise DatasetError(f"{start.checkpoint} was trained on examples not in {library.path}: {', '.join(missing[:5])}")
    else:
        train_keys, val_keys = split_keys(library.keys, config.test_fraction, seed)
    train_loader = ExampleLoader(library, train_keys, input_shape, output_shape, config.augmentation)
    val_loader = ExampleLoader(library, val_keys, input_shape, output_shape) if val_keys else None
    steps = config.steps_per_epoch or math.ceil(len(train_keys) / config.batch_size)
    monitor = "val_loss" if val_keys else "loss"
    history: list[dict] = list(info["history"]) if info is not None else []
    run_id = info["run_id"] if info is not None else secrets.token_hex(8)

    # --- everything checked: write ---
    output_dir.mkdir(parents=True, exist_ok=True)
    if start.replace:
        log.info("replacing the earlier run %s in %s (%s)", name, output_dir, _some(start.replace))
        for path in start.replace:
            path.unlink(missing_ok=True)
    _remove_partials(output_dir, name)
    split_file = output_dir / f"{name}_split.json"
    tmp = split_file.with_name(split_file.name + ".partial")
    tmp.write_text(json.dumps({"seed": seed, "training": train_keys, "validation": val_keys}, indent=1))
    os.replace(tmp, split_file)
    if visualization_sample:
        write_samples(train_loader, output_dir, seed)

    from .inference import import_tensorflow

    import_tensorflow()  # quietly (TensorFlow's C++ start-up lines), before Keras imports it
    import keras

    from .unet import build_unet, load_unet

    keras.utils.set_random_seed(seed + start.epoch)
    if start.weights is not None:
        model, _ = load_unet(start.weights, input_shape=input_shape)
    else:
        model = build_unet(input_shape, unet_config)
    train_ds = training_dataset(train_loader, config.batch_size, seed, start.epoch, config.parallel_calls, steps_per_epoch=steps)
    val_ds = validation_dataset(val_loader, config.batch_size, config.parallel_calls) if val_loader else None
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    model.compile(
        optimizer=optimizer,
        loss=weighted_cce_dice_loss((1.0, config.object_class_weight), config.dice_weight),
        metrics=training_metrics(unet_config.n_classes),
    )
    if start.checkpoint is not None:
        sidecar = state_path(start.checkpoint)
        values, names, _ = load_training_state(sidecar)
        restore_optimizer(optimizer, model.trainable_variables, values, names, sidecar)
        restore_model_state(model, sidecar)
        log.info("resuming from %s at epoch %d (optimizer and generator state from %s)", start.checkpoint, start.epoch, sidecar)

    log_path = output_dir / f"{name}.log"
    info_base = {
        "format": STATE_FORMAT,
        "model_name": name,
        "run_id": run_id,
        "seed": seed,
        "monitor": monitor,
        "unet_config": asdict(unet_config),
        "dataset": str(library.path),
        "settings": config.settings(),
        "training": train_keys,
        "validation": val_keys,
    }
    best = {"value": start.best_value, "epoch": start.best_epoch}
    first_epoch = start.epoch

    class EpochCommit(keras.callbacks.Callback):
        """Per epoch: the best model, the checkpoint with its state, the log and the curves."""

        epoch = first_epoch

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            testhook.checkpoint(f"train:epoch{self.epoch + 1}:step{batch + 1}")
            if progress is not None:
                progress((self.epoch - first_epoch) * steps + batch + 1, config.epochs * steps)

        def on_epoch_end(self, epoch, logs=None):
            n, moment = epoch + 1, f"train:epoch{epoch + 1}:"
            history.append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}})
            value = history[-1].get(monitor, math.nan)
            if math.isfinite(value) and value < best["value"]:
                best.update(value=value, epoch=n)
                path = output_dir / f"{name}_best.h5"
                record = {"run_id": run_id, "epoch": n, "value": value, "monitor": monitor}
                os.replace(_save_model(self.model, path, unet_config, {BEST_ATTRIBUTE: record}), path)
                testhook.checkpoint(f"{moment}best-written")
            info = {**info_base, "epoch": n, "best_value": best["value"], "best_epoch": best["epoch"], "history": history}
            commit_checkpoint(self.model, output_dir / f"{name}{n}.h5", unet_config, info, moment)
            write_log(log_path, history)
            plot_history(_columns(history), output_dir)
            testhook.checkpoint(f"{moment}epoch-end")

    log.info(
        "training %s: %d training / %d validation examples, %d steps per epoch, epochs %d-%d, seed %d",
        name, len(train_keys), len(val_keys), steps, start.epoch + 1, start.epoch + config.epochs, seed,
    )
    model.fit(
        train_ds,
        epochs=start.epoch + config.epochs,
        initial_epoch=start.epoch,
        steps_per_epoch=steps,
        validation_data=val_ds,
        verbose=config.verbose,
        shuffle=False,  # the dataset is shuffled (seeded) by epoch_plan
        callbacks=[EpochCommit(), *callbacks],
    )
    library.close()
    return TrainingResult(
        output_dir=output_dir,
        model_name=name,
        first_epoch=start.epoch + 1,
        last_epoch=start.epoch + config.epochs,
        n_train=len(train_keys),
        n_val=len(val_keys),
        monitor=monitor,
        best_value=best["value"],
        best_epoch=best["epoch"],
        seed=seed,
        seconds=time.perf_counter() - t0,
        history=_columns(history),
    )
