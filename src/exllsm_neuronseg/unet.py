"""The ExLLSM 3D U-Net (Keras 3): builder, legacy-HDF5 weight loading and tile-size arithmetic.

The running model for segmentation is :class:`.inference.Predictor`, which reads the weights with
:func:`read_model_weights`; this module never imports :mod:`.inference`.

The architecture is the original tool's (valid 3x3x3 convolutions, centre-cropped skip
connections, raw logits out).  Layer names and per-block configuration match the published
``neuron_2021.h5`` so that its weights load by name, and models this package saves load in the
original tool too.

TensorFlow is imported lazily: importing this module costs nothing until a model is built.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import GeometryError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    import keras

BLOCK_CLASS_NAMES = ("InputBlock", "DownsampleBlock", "BottleneckBlock", "UpsampleBlock", "OutputBlock")


# --------------------------------------------------------------------------------------------
# Hyper-parameters and size arithmetic (no TensorFlow needed)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the U-Net (the original tool's build_unet arguments)."""

    n_blocks: int = 2
    initial_filters: int = 4
    n_classes: int = 2
    bottleneck_dropout_rate: float = 0.2
    spatial_dropout: bool = False
    spatial_dropout_rate: float = 0.2

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise GeometryError(f"n_blocks must be >= 1, got {self.n_blocks}")
        if self.initial_filters < 1:
            raise GeometryError(f"initial_filters must be >= 1, got {self.initial_filters}")
        if self.n_classes < 2:
            raise GeometryError(f"n_classes must be >= 2, got {self.n_classes}")

    @property
    def tile_grid(self) -> int:
        """Tile origins on multiples of this keep predictions translation-equivariant."""
        return 2 ** (self.n_blocks + 1)


def output_size(input_size: int, n_blocks: int = 2) -> int | None:
    """Output edge of a valid-convolution U-Net for ``input_size``, or None if not valid."""
    s = input_size - 4  # input block: two 3x3x3 valid convs
    if s <= 0 or s % 2:
        return None
    s //= 2
    for _ in range(n_blocks):  # down blocks
        s -= 4
        if s <= 0 or s % 2:
            return None
        s //= 2
    s = (s - 4) * 2  # bottleneck convs + transposed conv
    if s <= 0:
        return None
    for _ in range(n_blocks):  # up blocks
        s = (s - 4) * 2
        if s <= 0:
            return None
    s -= 4  # output block
    return s if s > 0 else None


def skip_sizes(input_size: int, n_blocks: int = 2) -> list[int]:
    """Per level 0..n_blocks, the edge of the skip tensor (the level's second conv output)."""
    skips, s = [], input_size - 4
    for _ in range(n_blocks):
        skips.append(s)
        s = s // 2 - 4
    return skips + [s]


def skip_crops(input_size: int, n_blocks: int = 2) -> list[int]:
    """Per level 0..n_blocks, how much larger each skip tensor is than the decoder tensor it meets."""
    skips = skip_sizes(input_size, n_blocks)
    x = (skips[-1] // 2 - 4) * 2
    decoder = {}
    for k in range(n_blocks, 0, -1):
        decoder[k] = x
        x = (x - 4) * 2
    decoder[0] = x
    return [skips[k] - decoder[k] for k in range(n_blocks + 1)]


def valid_input_sizes(n_blocks: int = 2, upto: int = 400) -> list[int]:
    """All valid input edges up to ``upto`` (for error messages)."""
    return [s for s in range(1, upto + 1) if output_size(s, n_blocks) is not None]


def margin(n_blocks: int = 2) -> int:
    """Context voxels the model consumes on each side of its output."""
    smallest = valid_input_sizes(n_blocks, 4096)[0]
    return (smallest - output_size(smallest, n_blocks)) // 2


def describe_valid_sizes(n_blocks: int = 2) -> str:
    sizes = valid_input_sizes(n_blocks, 4096)
    step = sizes[1] - sizes[0]
    m = margin(n_blocks)
    return (
        f"input edge s with s % {step} == {sizes[0] % step} and s >= {sizes[0]} "
        f"(e.g. {', '.join(str(s) for s in sizes[:3])}, ..., 220, ...), output edge s - {2 * m}"
    )


PREFERRED_TILE_SHAPE = (348, 348, 220)  # x,y,z


def default_tile_shape(image_shape: Sequence[int], n_blocks: int = 2) -> tuple[int, int, int]:
    """The tile shape (x,y,z input edges) used when none is given.

    348 x 348 x 220 tiles (output 260 x 260 x 132, on a global grid of stride 256 x 256 x 128, so
    512-blocks hold whole tiles) do about 25% less work per voxel than 220^3 tiles and keep the
    working set near 1 GB; z is the short edge because it is the slab axis of the output buffer.
    Along an axis shorter than that tile's stride the smallest tile covering it is used.  The
    choice depends only on the image, so every block of a volume uses the same tiles.
    """
    grid = UNetConfig(n_blocks=n_blocks).tile_grid
    shape = []
    for extent, preferred in zip(image_shape, PREFERRED_TILE_SHAPE):
        edge = preferred
        for s in valid_input_sizes(n_blocks, preferred):
            if output_size(s, n_blocks) // grid * grid >= extent:  # one tile's stride covers the axis
                edge = s
                break
        shape.append(edge)
    return tuple(shape)  # type: ignore[return-value]


def check_tile_shapes(
    input_shape: Sequence[int], output_shape: Sequence[int] | None, n_blocks: int = 2
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Validate an (input, output) tile-shape pair for the model; return both as tuples."""
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3:
        raise GeometryError(f"model input shape must have 3 values x,y,z, got {input_shape}")
    expected = []
    for s in input_shape:
        o = output_size(s, n_blocks)
        if o is None:
            raise GeometryError(
                f"model input shape {','.join(map(str, input_shape))} is not valid for this U-Net "
                f"({n_blocks} down blocks): edge {s} is not allowed; valid: {describe_valid_sizes(n_blocks)}"
            )
        expected.append(o)
    expected_t = tuple(expected)
    if output_shape is not None:
        output_shape = tuple(int(v) for v in output_shape)
        if output_shape != expected_t:
            raise GeometryError(
                f"model output shape {','.join(map(str, output_shape))} does not match input shape "
                f"{','.join(map(str, input_shape))}: this U-Net gives {','.join(map(str, expected_t))}"
            )
    return input_shape, expected_t  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Keras layers
# --------------------------------------------------------------------------------------------

_LAYER_CLASSES: dict[str, type] = {}


def _keras_layers() -> dict[str, type]:
    """Define the block classes on first use (imports Keras)."""
    if _LAYER_CLASSES:
        return _LAYER_CLASSES
    import keras
    from keras import layers, ops

    def conv(filters: int, kernel: int = 3, activation: str | None = "relu", name: str | None = None):
        return layers.Conv3D(filters, kernel, padding="valid", activation=activation, name=name)

    def centre_crop(skip, like):
        starts = [(skip.shape[i] - like.shape[i]) // 2 for i in (1, 2, 3)]
        return skip[
            :,
            starts[0] : starts[0] + like.shape[1],
            starts[1] : starts[1] + like.shape[2],
            starts[2] : starts[2] + like.shape[3],
            :,
        ]

    class _Block(layers.Layer):
        """Common base: ``weight_layers`` lists the layers holding weights, in file order."""

        def weight_layers(self) -> list:
            raise NotImplementedError

    class InputBlock(_Block):
        def __init__(self, initial_filters: int = 4, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.initial_filters = initial_filters
            self.conv1 = conv(initial_filters)
            self.conv2 = conv(2 * initial_filters)
            self.pool = layers.MaxPooling3D(2, 2)

        def call(self, x):
            skip = self.conv2(self.conv1(x))
            return self.pool(skip), skip

        def weight_layers(self):
            return [self.conv1, self.conv2]

        def get_config(self):
            return {**super().get_config(), "initial_filters": self.initial_filters}

    class DownsampleBlock(_Block):
        def __init__(
            self,
            filters: int,
            index: int,
            spatial_dropout: bool = False,
            spatial_dropout_rate: float = 0.2,
            **kwargs: Any,
        ) -> None:
            super().__init__(**kwargs)
            self.filters, self.index = filters, index
            self.spatial_dropout, self.spatial_dropout_rate = bool(spatial_dropout), spatial_dropout_rate
            self.conv1 = conv(filters)
            self.conv2 = conv(2 * filters)
            self.pool = layers.MaxPooling3D(2, 2)
            self.dropout1 = layers.SpatialDropout3D(spatial_dropout_rate) if spatial_dropout else None
            self.dropout2 = layers.SpatialDropout3D(spatial_dropout_rate) if spatial_dropout else None

        def call(self, x, training=None):
            if self.dropout1 is not None:
                x = self.dropout1(x, training=training)
            x = self.conv1(x)
            if self.dropout2 is not None:
                x = self.dropout2(x, training=training)
            skip = self.conv2(x)
            return self.pool(skip), skip

        def weight_layers(self):
            return [self.conv1, self.conv2]

        def get_config(self):
            return {
                **super().get_config(),
                "filters": self.filters,
                "index": self.index,
                "spatial_dropout": self.spatial_dropout,
                "spatial_dropout_rate": self.spatial_dropout_rate,
            }

    class BottleneckBlock(_Block):
        def __init__(self, filters: int, dropout_rate: float = 0.2, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.filters, self.dropout_rate = filters, dropout_rate
            self.conv1 = conv(filters)
            self.conv2 = conv(2 * filters)
            self.dropout = layers.Dropout(dropout_rate)
            self.up = layers.Conv3DTranspose(2 * filters, 2, strides=2, padding="valid")

        def call(self, x, training=None):
            x = self.conv2(self.conv1(x))
            x = self.dropout(x, training=training)
            return self.up(x)

        def weight_layers(self):
            return [self.conv1, self.conv2, self.up]

        def get_config(self):
            return {**super().get_config(), "filters": self.filters, "dropout_rate": self.dropout_rate}

    class UpsampleBlock(_Block):
        def __init__(self, filters: int, index: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.filters, self.index = filters, index
            self.conv1 = conv(filters)
            self.conv2 = conv(filters)
            self.up = layers.Conv3DTranspose(filters, 2, strides=2, padding="valid")

        def call(self, inputs):
            x, skip = inputs
            x = ops.concatenate([x, centre_crop(skip, x)], axis=-1)
            return self.up(self.conv2(self.conv1(x)))

        def weight_layers(self):
            return [self.conv1, self.conv2, self.up]

        def get_config(self):
            return {**super().get_config(), "filters": self.filters, "index": self.index}

    class OutputBlock(_Block):
        def __init__(self, filters: int, n_classes: int = 2, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.filters, self.n_classes = filters, n_classes
            self.conv1 = conv(filters)
            self.conv2 = conv(filters)
            self.logits = conv(n_classes, kernel=1, activation=None)

        def call(self, inputs):
            x, skip = inputs
            x = ops.concatenate([x, centre_crop(skip, x)], axis=-1)
            return self.logits(self.conv2(self.conv1(x)))

        def weight_layers(self):
            return [self.conv1, self.conv2, self.logits]

        def get_config(self):
            return {**super().get_config(), "filters": self.filters, "n_classes": self.n_classes}

    for cls in (InputBlock, DownsampleBlock, BottleneckBlock, UpsampleBlock, OutputBlock):
        _LAYER_CLASSES[cls.__name__] = keras.saving.register_keras_serializable("exllsm_neuronseg")(cls)
    return _LAYER_CLASSES


def custom_objects() -> dict[str, type]:
    """The block classes, for ``keras.models.load_model(custom_objects=...)``."""
    return dict(_keras_layers())


def block_names(n_blocks: int) -> dict[str, list[str]]:
    """Layer names of the blocks, as the original (and the published model file) names them."""
    return {
        "input": ["input_block"],
        "down": ["downsample_block" if k == 1 else f"downsample_block_{k - 1}" for k in range(1, n_blocks + 1)],
        "bottleneck": ["bottleneck_block"],
        "up": ["upsample_block" if i == 0 else f"upsample_block_{i}" for i in range(n_blocks)],
        "output": ["output_block"],
    }


def mirrored(kernel: np.ndarray) -> np.ndarray:
    """A conv kernel with its three spatial axes reversed (x,y,z arrays -> z,y,x arrays)."""
    return np.ascontiguousarray(kernel.transpose(2, 1, 0, 3, 4))


def build_unet(
    input_shape: Sequence[int] = (220, 220, 220),
    config: UNetConfig = UNetConfig(),
    batch_size: int | None = None,
) -> "keras.Model":
    """Build the U-Net for tiles of ``input_shape`` (x,y,z); the output is raw logits.

    Layer names follow the original (``input_block``, ``downsample_block``,
    ``downsample_block_1``, ..., ``bottleneck_block``, ``upsample_block``, ...,
    ``output_block``) so that weights files map by name.
    """
    import keras

    check_tile_shapes(input_shape, None, config.n_blocks)
    blocks = _keras_layers()
    f0 = config.initial_filters
    inputs = keras.Input(shape=(*input_shape, 1), batch_size=batch_size, name="input_1")
    crops = [skip_crops(s, config.n_blocks) for s in input_shape]  # per axis, per level

    def cropped(skip, level: int):
        # Crop each skip as soon as it exists: the full-size tensor is freed right after pooling
        # instead of living until the decoder needs its centre.
        amounts = tuple((c[level] // 2, c[level] - c[level] // 2) for c in crops)
        return keras.layers.Cropping3D(amounts, name=f"skip_crop_{level}")(skip)

    names = block_names(config.n_blocks)
    x, skip0 = blocks["InputBlock"](f0, name=names["input"][0])(inputs)
    skip0 = cropped(skip0, 0)
    skips = []
    for k, name in enumerate(names["down"], start=1):
        x, s = blocks["DownsampleBlock"](
            2 * f0 * 2 ** (k - 1),
            k,
            spatial_dropout=config.spatial_dropout,
            spatial_dropout_rate=config.spatial_dropout_rate,
            name=name,
        )(x)
        skips.append(cropped(s, k))
    x = blocks["BottleneckBlock"](
        2 * f0 * 2**config.n_blocks, dropout_rate=config.bottleneck_dropout_rate, name=names["bottleneck"][0]
    )(x)
    for k, name in zip(range(config.n_blocks, 0, -1), names["up"]):
        x = blocks["UpsampleBlock"](2 * f0 * 2**k, k, name=name)([x, skips[k - 1]])
    logits = blocks["OutputBlock"](2 * f0, config.n_classes, name=names["output"][0])([x, skip0])
    return keras.Model(inputs, logits, name="model")


# --------------------------------------------------------------------------------------------
# Weights files (legacy Keras HDF5 layout, as written by tf.keras 2.x)
# --------------------------------------------------------------------------------------------


@dataclass
class ModelWeights:
    """Weights and hyper-parameters read from a model file, independent of any tile size."""

    path: Path
    config: UNetConfig
    input_shape: tuple[int, int, int] | None
    # layer name -> list of (kernel, bias) pairs in file order
    layers: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def apply_to(self, model: "keras.Model", axes: str = "xyz") -> None:
        """Assign these weights to a model built by :func:`build_unet` (any tile size).

        With ``axes="zyx"`` the kernels' spatial axes are reversed, so the model takes arrays in
        z,y,x (N5 storage) order and computes the same function without transposing any data.
        """
        if axes not in ("xyz", "zyx"):
            raise ValueError(f"axes must be 'xyz' or 'zyx', got {axes!r}")
        for layer in model.layers:
            if not hasattr(layer, "weight_layers"):
                continue
            pairs = self.layers.get(layer.name)
            targets = layer.weight_layers()
            if pairs is None or len(pairs) != len(targets):
                raise ModelError(
                    f"{self.path}: layer {layer.name!r} has "
                    f"{'no weights' if pairs is None else f'{len(pairs)} weighted sub-layers'}, "
                    f"expected {len(targets)}; not this U-Net"
                )
            for target, (kernel, bias) in zip(targets, pairs):
                want = tuple(target.kernel.shape)
                if kernel.shape != want or bias.shape != tuple(target.bias.shape):
                    raise ModelError(
                        f"{self.path}: layer {layer.name!r} has a kernel of shape {kernel.shape}, "
                        f"expected {want}; not this U-Net"
                    )
                if axes == "zyx":
                    kernel = mirrored(kernel)
                target.set_weights([kernel, bias])

    def kernels(self, axes: str = "xyz") -> dict[str, Any]:
        """The (kernel, bias) pairs grouped by block, spatial kernel axes in ``axes`` array order.

        Keys: ``input`` (2 convs), ``down`` (per level, 2 convs), ``bottleneck`` (2 convs and the
        transposed conv), ``up`` (per level from the deepest, 2 convs and the transposed conv),
        ``output`` (2 convs and the 1x1 logits conv).
        """
        if axes not in ("xyz", "zyx"):
            raise ValueError(f"axes must be 'xyz' or 'zyx', got {axes!r}")
        names = block_names(self.config.n_blocks)

        def pairs(name: str) -> list[tuple[np.ndarray, np.ndarray]]:
            if name not in self.layers:
                raise ModelError(f"{self.path}: layer {name!r} has no weights; not this U-Net")
            if axes == "xyz":
                return list(self.layers[name])
            return [(mirrored(k), b) for k, b in self.layers[name]]

        out: dict[str, Any] = {key: [pairs(n) for n in group] for key, group in names.items()}
        for key in ("input", "bottleneck", "output"):
            out[key] = out[key][0]
        return out


def _decode(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _config_from_model_config(model_config: dict, path: Path) -> tuple[UNetConfig, tuple | None]:
    try:
        layer_list = model_config["config"]["layers"]
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{path}: model_config has no layer list; not a Keras functional model") from exc
    by_class: dict[str, list[dict]] = {}
    input_shape = None
    for layer in layer_list:
        cls = layer.get("class_name")
        cfg = layer.get("config", {})
        by_class.setdefault(cls, []).append(cfg)
        if cls == "InputLayer":
            shape = cfg.get("batch_input_shape") or cfg.get("batch_shape")
            if shape and len(shape) == 5 and all(isinstance(v, int) for v in shape[1:4]):
                input_shape = tuple(shape[1:4])
    missing = [c for c in BLOCK_CLASS_NAMES if c not in by_class]
    if missing:
        raise ModelError(
            f"{path}: not this U-Net: layers {', '.join(missing)} are missing "
            f"(expected {', '.join(BLOCK_CLASS_NAMES)})"
        )
    down = by_class["DownsampleBlock"]
    out = by_class["OutputBlock"][0]
    bottleneck = by_class["BottleneckBlock"][0]
    config = UNetConfig(
        n_blocks=len(down),
        initial_filters=int(by_class["InputBlock"][0]["initial_filters"]),
        n_classes=int(out.get("n_classes", 2)),
        bottleneck_dropout_rate=float(bottleneck.get("dropout_rate", 0.2)),
        spatial_dropout=bool(down[0].get("spatial_dropout", False)),
        spatial_dropout_rate=float(down[0].get("spatial_dropout_rate", 0.2)),
    )
    return config, input_shape


def read_model_weights(path: str | Path, data: bytes | None = None) -> ModelWeights:
    """Read a U-Net model file (the published legacy ``.h5`` or one this package saved).

    ``data``: the file's bytes, already read (the caller hashed them), parsed instead of the file.
    """
    import io

    import h5py

    path = Path(path)
    if data is None and not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        h5 = h5py.File(io.BytesIO(data) if data is not None else path, "r")
    except OSError as exc:
        raise ModelError(f"model file {path} is not a readable HDF5 file ({exc})") from exc
    with h5:
        if "model_config" not in h5.attrs:
            raise ModelError(f"{path}: no 'model_config' attribute; not a Keras HDF5 model file")
        try:
            model_config = json.loads(_decode(h5.attrs["model_config"]))
        except ValueError as exc:
            raise ModelError(f"{path}: 'model_config' is not valid JSON ({exc})") from exc
        config, input_shape = _config_from_model_config(model_config, path)
        group = h5["model_weights"] if "model_weights" in h5 else h5
        weights = ModelWeights(path=path, config=config, input_shape=input_shape)
        for layer_name in group.attrs.get("layer_names", []):
            layer_name = _decode(layer_name)
            names = [_decode(n) for n in group[layer_name].attrs.get("weight_names", [])]
            if not names:
                continue
            arrays = [np.asarray(group[layer_name][n], dtype=np.float32) for n in names]
            if len(arrays) % 2:
                raise ModelError(f"{path}: layer {layer_name!r} has an odd number of weight arrays")
            weights.layers[layer_name] = [(arrays[i], arrays[i + 1]) for i in range(0, len(arrays), 2)]
    if not weights.layers:
        raise ModelError(f"{path}: the file holds no layer weights")
    return weights


def load_unet(path: str | Path, input_shape: Sequence[int] | None = None, batch_size: int | None = None):
    """Build the U-Net stored in ``path`` at ``input_shape`` (default: the stored one) with its weights."""
    weights = read_model_weights(path)
    shape = tuple(input_shape) if input_shape is not None else weights.input_shape or (220, 220, 220)
    model = build_unet(shape, weights.config, batch_size=batch_size)
    weights.apply_to(model)
    return model, weights


def save_unet(model: "keras.Model", path: str | Path, config: UNetConfig) -> None:
    """Save weights and architecture in the legacy Keras HDF5 layout the original tool reads.

    The file is written to a temporary name and renamed, so a killed job never leaves a
    half-written model behind.
    """
    import h5py

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    layer_configs: list[dict] = []
    input_shape = list(model.inputs[0].shape)
    layer_configs.append(
        {
            "class_name": "InputLayer",
            "name": "input_1",
            "config": {"batch_input_shape": [None, *input_shape[1:]], "dtype": "float32", "name": "input_1"},
        }
    )
    with h5py.File(tmp, "w") as h5:
        h5.attrs["backend"] = "tensorflow"
        h5.attrs["keras_version"] = "exllsm_neuronseg"
        group = h5.create_group("model_weights")
        names = []
        for layer in model.layers:
            if not hasattr(layer, "weight_layers"):
                continue
            names.append(layer.name)
            cfg = layer.get_config()
            layer_configs.append({"class_name": type(layer).__name__, "name": layer.name, "config": cfg})
            lg = group.create_group(layer.name)
            weight_names = []
            for sub in layer.weight_layers():
                for var, suffix in ((sub.kernel, "kernel:0"), (sub.bias, "bias:0")):
                    name = f"{layer.name}/{sub.name}/{suffix}"
                    lg.create_dataset(name, data=np.asarray(var.numpy(), dtype=np.float32))
                    weight_names.append(name.encode("utf8"))
            lg.attrs["weight_names"] = weight_names
        group.attrs["layer_names"] = [n.encode("utf8") for n in names]
        model_config = {"class_name": "Model", "config": {"name": "model", "layers": layer_configs}}
        h5.attrs["model_config"] = json.dumps(model_config)
        h5.attrs["unet_config"] = json.dumps(config.__dict__)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# Work per tile (the running model is :class:`.inference.Predictor`)
# --------------------------------------------------------------------------------------------


def conv_flops(input_shape: Sequence[int], config: UNetConfig) -> float:
    """Convolution FLOPs of one forward pass at ``input_shape`` (x,y,z)."""
    vol = lambda s: float(math.prod(s))  # noqa: E731
    shrink = lambda s, k=2: tuple(v - k for v in s)  # noqa: E731
    f0, total = config.initial_filters, 0.0
    s = tuple(input_shape)
    s1 = shrink(s)
    total += vol(s1) * 27 * 1 * f0
    s2 = shrink(s1)
    total += vol(s2) * 27 * f0 * 2 * f0
    skips, cin, s = [s2], 2 * f0, tuple(v // 2 for v in s2)
    for k in range(1, config.n_blocks + 1):
        f = 2 * f0 * 2 ** (k - 1)
        s = shrink(s)
        total += vol(s) * 27 * cin * f
        s = shrink(s)
        total += vol(s) * 27 * f * 2 * f
        skips.append(s)
        cin, s = 2 * f, tuple(v // 2 for v in s)
    fb = 2 * f0 * 2**config.n_blocks
    s = shrink(s)
    total += vol(s) * 27 * cin * fb
    s = shrink(s)
    total += vol(s) * 27 * fb * 2 * fb
    total += vol(s) * 8 * 2 * fb * 2 * fb
    cin, s = 2 * fb, tuple(2 * v for v in s)
    for k in range(config.n_blocks, 0, -1):
        f = 2 * f0 * 2**k
        cin += 2 * f // 2  # the cropped skip has 2*f_k/2 channels
        s = shrink(s)
        total += vol(s) * 27 * cin * f
        s = shrink(s)
        total += vol(s) * 27 * f * f
        total += vol(s) * 8 * f * f
        cin, s = f, tuple(2 * v for v in s)
    cin += 2 * f0
    s = shrink(s)
    total += vol(s) * 27 * cin * 2 * f0
    s = shrink(s)
    total += vol(s) * 27 * 2 * f0 * 2 * f0
    total += vol(s) * 2 * f0 * config.n_classes
    return 2.0 * total
