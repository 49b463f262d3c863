#!/usr/bin/env python3
"""GPU benchmark: U-Net tile throughput on one GPU (engine fp32 / bf16 / fp16; Keras baseline).

Run on a machine with one NVIDIA GPU, from the repository root, in an environment with the
package's dependencies and TensorFlow's CUDA build (e.g. ``pip install -e . 'tensorflow[and-cuda]'``;
``src/`` is put on the path, so the package itself need not be installed).  The model defaults to
``../shared/models/neuron_2021.h5`` beside the checkout; elsewhere give ``--model``::

    python bench/bench_gpu.py --output gpu.json
    CUDA_VISIBLE_DEVICES=1 python bench/bench_gpu.py --output gpu.json   # one GPU of several

Everything runs on in-memory synthetic tiles (no I/O), on the first visible GPU.  Measured:

* the runtime engine (``exllsm_neuronseg.inference.Predictor``, z,y,x arrays) at fp32, bf16 and
  fp16, on the default 348x348x220 tiles and on 220^3 tiles;
* the baseline in the original tool's style: the Keras model (``unet.load_unet(path,
  (220,220,220))``) with ``model.predict`` on one 220^3 tile at a time (batch 1), then the softmax
  of its logits in numpy.

Per configuration: the setup (``Predictor`` reading the model file, or ``load_unet`` importing
Keras and building the model), the first call (engine build and tracing, or Keras' first
predict), seconds per tile (median and min of ``--repeats`` calls after ``--warmup`` more, two
different tiles in turn), Mvox/s of owned output (the voxels a tile contributes to the volume: the output edge
rounded down to the model grid of 8 for the engine, 256x256x128 and 128^3; the whole 132^3 output
for the original style, whose tiles step by their output edge), Mvox/s of tile output, peak GPU
memory, and max |Δp|, binary-mask (p > 0.5) agreement and foreground Dice against the fp32
engine on the same tiles.  Also the seconds to import TensorFlow and to run its first GPU op (what
every job pays before its first tile).  A configuration that this GPU cannot run (bf16 needs
compute capability 8.0) or that fails is recorded with its error and the rest still run.

With no GPU visible the script stops with an error, unless ``--allow-cpu`` is given: then it
runs on the CPU with tiny tiles (132x132x108 and 108^3, Keras 108^3, one warm-up, two repeats), a
smoke test of the script, not a measurement.  TensorFlow's memory growth is on by default
(``--set-memory-growth``; ``--no-set-memory-growth`` lets TensorFlow reserve the whole GPU), so the
peak memory is what the model needs.  Expected to take a few minutes on an H200 (estimated, not
yet measured: it has not run on a GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "neuron_2021.h5"
GPU_TILES = ["348,348,220", "220,220,220"]
CPU_TILES = ["132,132,108", "108,108,108"]


def parse_xyz(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give x,y,z")
    return tuple(parts)  # type: ignore[return-value]


def fmt(shape) -> str:
    return "x".join(map(str, shape))


def synthetic_tiles(shape_xyz: tuple[int, int, int], seed: int = 1):
    """Two different uint16 tiles (x,y,z) of ``shape_xyz``: a synthetic volume and its x,y-flip."""
    import numpy as np

    from exllsm_neuronseg.synthetic import SyntheticSpec, synthetic_volume

    scale = (math.prod(shape_xyz) / 128**3) ** (1 / 3)
    spec = SyntheticSpec(shape=shape_xyz, n_tubes=max(2, round(6 * scale)), n_puncta=round(30 * scale**3), seed=seed)
    image, _ = synthetic_volume(spec)
    return [image, np.ascontiguousarray(image[::-1, ::-1, :])]


def crop_zyx(tile_xyz, shape_xyz):
    """The first ``shape_xyz`` voxels of an x,y,z tile, as a contiguous z,y,x array."""
    import numpy as np

    return np.ascontiguousarray(tile_xyz[: shape_xyz[0], : shape_xyz[1], : shape_xyz[2]].transpose(2, 1, 0))


def agreement(ref, p) -> dict:
    import numpy as np

    ma, mb = ref > 0.5, p > 0.5
    fg = int(ma.sum()) + int(mb.sum())
    return {
        "max_abs_dp_vs_fp32": float(np.max(np.abs(ref.astype(np.float64) - p))),
        "mask_agreement_vs_fp32": float(np.mean(ma == mb)),
        "dice_vs_fp32": 2 * int((ma & mb).sum()) / fg if fg else 1.0,
    }


class Memory:
    """Peak device memory of one configuration (None where TensorFlow does not track it)."""

    def __init__(self, tf, device: str) -> None:
        self.tf, self.device = tf, device

    def reset(self) -> None:
        try:
            self.tf.config.experimental.reset_memory_stats(self.device)
        except (ValueError, RuntimeError, AttributeError):
            pass

    def peak_gb(self) -> float | None:
        try:
            return self.tf.config.experimental.get_memory_info(self.device)["peak"] / 1e9
        except (ValueError, RuntimeError, AttributeError):
            return None


def time_calls(fn, inputs, warmup: int, repeats: int) -> dict:
    """First call, then ``warmup`` untimed calls, then ``repeats`` timed ones (inputs in turn);
    ``outputs`` holds the output of every input."""
    outputs: dict[int, object] = {}

    def call(i: int) -> float:
        t = time.perf_counter()
        out = fn(inputs[i % len(inputs)])
        elapsed = time.perf_counter() - t
        outputs.setdefault(i % len(inputs), out)
        return elapsed

    first = call(0)
    for i in range(warmup):
        call(i + 1)
    times = [call(i) for i in range(repeats)]
    for i in range(len(inputs)):
        if i not in outputs:
            call(i)
    return {"first_call_s": first, "times": times, "outputs": [outputs[i] for i in range(len(inputs))]}


def summarise(name: str, timing: dict, owned, output, memory: Memory) -> dict:
    median = statistics.median(timing["times"])
    return {
        "config": name,
        "first_call_s": timing["first_call_s"],
        "s_per_tile_median": median,
        "s_per_tile_min": min(timing["times"]),
        "s_per_tile_all": timing["times"],
        "owned_shape": list(owned),
        "output_shape": list(output),
        "mvox_s_owned": math.prod(owned) / median / 1e6,
        "mvox_s_output": math.prod(output) / median / 1e6,
        "peak_memory_gb": memory.peak_gb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="gpu.json", help="JSON report (default gpu.json)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--tiles", nargs="+", type=parse_xyz, help=f"engine tiles x,y,z (default {' '.join(GPU_TILES)})")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--keras-tile", type=parse_xyz, help="tile of the Keras baseline (default 220,220,220)")
    parser.add_argument("--no-keras", action="store_true", help="skip the Keras model.predict baseline")
    parser.add_argument("--warmup", type=int, help="untimed calls after the first (default 2; --allow-cpu 1)")
    parser.add_argument("--repeats", type=int, help="timed calls (default 7; --allow-cpu 2)")
    parser.add_argument("--scaling", type=float, default=0.00045)
    parser.add_argument("--set-memory-growth", action=argparse.BooleanOptionalAction, default=True,
                        help="TensorFlow allocates GPU memory as needed (default on)")
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU, run a smoke test on the CPU with tiny tiles")
    args = parser.parse_args()
    if not Path(args.model).is_file():
        parser.error(f"model file {args.model} not found: give --model PATH")

    t0 = time.perf_counter()
    from exllsm_neuronseg.inference import import_tensorflow

    tf = import_tensorflow()
    import_s = time.perf_counter() - t0
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.allow_cpu:
        built = "TensorFlow here is built with CUDA" if tf.test.is_built_with_cuda() else "TensorFlow here is built without CUDA"
        sys.exit(
            "error: no GPU is visible to TensorFlow (tf.config.list_physical_devices('GPU') is empty; "
            f"{built}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Run this on a machine "
            "with an NVIDIA GPU and TensorFlow's CUDA build (pip install 'tensorflow[and-cuda]'), or pass --allow-cpu "
            "for a smoke test of the script on the CPU with tiny tiles."
        )
    if args.set_memory_growth:
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
    on_gpu = bool(gpus)
    tiles = args.tiles or [parse_xyz(t) for t in (GPU_TILES if on_gpu else CPU_TILES)]
    keras_tile = args.keras_tile or ((220, 220, 220) if on_gpu else (108, 108, 108))
    warmup = args.warmup if args.warmup is not None else (2 if on_gpu else 1)
    repeats = args.repeats if args.repeats is not None else (7 if on_gpu else 2)
    if repeats < 1 or warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")  # the reference
    precisions.sort(key=lambda p: p != "fp32")

    import numpy as np

    from exllsm_neuronseg.inference import Predictor
    from exllsm_neuronseg.unet import check_tile_shapes

    device_name = "GPU:0" if on_gpu else "CPU:0"
    t = time.perf_counter()
    with tf.device(device_name):
        (tf.ones((64, 64)) @ tf.ones((64, 64))).numpy()
    init_s = time.perf_counter() - t
    info = {
        "device": device_name,
        "gpus_visible": len(gpus),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "tensorflow_import_s": import_s,
        "first_device_op_s": init_s,
        "smoke_test_on_cpu": not on_gpu,
        "memory_growth": bool(args.set_memory_growth and on_gpu),
    }
    if on_gpu:
        details = tf.config.experimental.get_device_details(gpus[0])
        info["gpu_name"] = details.get("device_name")
        info["compute_capability"] = ".".join(map(str, details.get("compute_capability") or ()))
    build = tf.sysconfig.get_build_info()
    info.update({k: build.get(k) for k in ("cuda_version", "cudnn_version") if build.get(k)})
    print(f"device {device_name}: {info.get('gpu_name', platform.processor() or 'CPU')}, TensorFlow {tf.__version__}; "
          f"import {import_s:.1f} s, first op {init_s:.1f} s", flush=True)
    if not on_gpu:
        print("no GPU: smoke test on the CPU with tiny tiles (not a measurement)", flush=True)

    t = time.perf_counter()
    extent = tuple(max(s[a] for s in [*tiles, keras_tile]) for a in range(3))
    sources = synthetic_tiles(extent)  # type: ignore[arg-type]
    print(f"synthetic tiles {fmt(extent)} ready in {time.perf_counter() - t:.1f} s", flush=True)
    memory = Memory(tf, device_name)
    scale = args.scaling
    results: list[dict] = []
    reference: dict[tuple, list] = {}  # tile shape -> fp32 engine outputs (z,y,x) on the two tiles

    for tile in tiles:
        inputs = [crop_zyx(s, tile) for s in sources]
        for precision in precisions:
            name = f"engine {precision} {fmt(tile)}"
            gc.collect()
            memory.reset()
            try:
                t = time.perf_counter()
                predictor = Predictor(args.model, tile, axes="zyx", precision=precision)
                setup = time.perf_counter() - t
                owned = predictor.grid.stride
                timing = time_calls(lambda x: predictor.predict(x, scale), inputs, warmup, repeats)
                row = {**summarise(name, timing, owned, predictor.output_shape, memory), "setup_s": setup}
            except Exception as exc:  # recorded; the other configurations still run
                row = {"config": name, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
                results.append(row)
                print(f"{name}: {row['error']}", flush=True)
                continue
            finally:
                predictor = None
            row.update({"engine": "Predictor", "precision": precision, "tile": list(tile)})
            outs = timing["outputs"]
            if precision == "fp32":
                reference[tuple(tile)] = outs
            if tuple(tile) in reference and precision != "fp32":
                row.update(agreement(np.stack(reference[tuple(tile)]), np.stack(outs)))
            results.append(row)
            print(f"{name}: {row['s_per_tile_median']:.3f} s/tile, {row['mvox_s_owned']:.1f} Mvox/s owned "
                  f"(first call {row['first_call_s']:.1f} s)", flush=True)

    if not args.no_keras:
        name = f"keras model.predict fp32 {fmt(keras_tile)}"
        gc.collect()
        memory.reset()
        try:
            from exllsm_neuronseg.unet import load_unet

            _, output = check_tile_shapes(keras_tile, None)
            t = time.perf_counter()
            model, _ = load_unet(args.model, keras_tile)
            setup = time.perf_counter() - t
            inputs_xyz = [np.ascontiguousarray(s[: keras_tile[0], : keras_tile[1], : keras_tile[2]]) for s in sources]

            def keras_predict(tile_xyz):
                x = (tile_xyz.astype(np.float32) * np.float32(scale))[None, ..., None]
                logits = model.predict(x, batch_size=1, verbose=0)[0]
                return 1.0 / (1.0 + np.exp(logits[..., 0] - logits[..., 1]))  # softmax channel 1 of two

            timing = time_calls(keras_predict, inputs_xyz, warmup, repeats)
            row = summarise(name, timing, output, output, memory)  # the original's tiles step by their output
            row["setup_s"] = setup
            row.update({"engine": "keras", "precision": "fp32", "tile": list(keras_tile)})
            if tuple(keras_tile) not in reference:
                ref = Predictor(args.model, keras_tile, axes="zyx")
                reference[tuple(keras_tile)] = [ref.predict(crop_zyx(s, keras_tile), scale) for s in sources]
                del ref
            outs = [o.transpose(2, 1, 0) for o in timing["outputs"]]
            row.update(agreement(np.stack(reference[tuple(keras_tile)]), np.stack(outs)))
            del model
            print(f"{name}: {row['s_per_tile_median']:.3f} s/tile, {row['mvox_s_owned']:.1f} Mvox/s owned "
                  f"(first call {row['first_call_s']:.1f} s)", flush=True)
        except Exception as exc:  # recorded; the other configurations still run
            row = {"config": name, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
            print(f"{name}: {row['error']}", flush=True)
        results.append(row)

    baseline = next((r for r in results if r.get("engine") == "keras" and "error" not in r), None)
    for r in results:
        if baseline is not None and "error" not in r:
            r["speed_vs_keras_baseline"] = r["mvox_s_owned"] / baseline["mvox_s_owned"]

    print()
    head = f"{'configuration':36s}{'first s':>9s}{'s/tile':>9s}{'Mvox/s':>9s}{'out Mv/s':>9s}{'peak GB':>9s}" \
           f"{'x keras':>9s}{'max|dp|':>10s}{'mask agr':>10s}{'Dice':>8s}"
    print(head)
    for r in results:
        if "error" in r:
            print(f"{r['config']:36s}  {r['error'][:100]}")
            continue
        peak = r["peak_memory_gb"]
        cells = [
            f"{r['first_call_s']:9.2f}", f"{r['s_per_tile_median']:9.3f}", f"{r['mvox_s_owned']:9.1f}",
            f"{r['mvox_s_output']:9.1f}", f"{peak:9.2f}" if peak is not None else f"{'-':>9s}",
            f"{r['speed_vs_keras_baseline']:9.2f}" if "speed_vs_keras_baseline" in r else f"{'-':>9s}",
            f"{r['max_abs_dp_vs_fp32']:10.2e}" if "max_abs_dp_vs_fp32" in r else f"{'-':>10s}",
            f"{r['mask_agreement_vs_fp32']:10.6f}" if "mask_agreement_vs_fp32" in r else f"{'-':>10s}",
            f"{r['dice_vs_fp32']:8.5f}" if "dice_vs_fp32" in r else f"{'-':>8s}",
        ]
        print(f"{r['config']:36s}" + "".join(cells))
    report = {
        "info": info,
        "settings": {"tiles": [list(t) for t in tiles], "keras_tile": None if args.no_keras else list(keras_tile),
                     "precisions": precisions, "warmup": warmup, "repeats": repeats, "scaling": scale,
                     "model": str(args.model)},
        "results": results,
        "total_s": time.perf_counter() - t0,
    }
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"\nreport: {args.output} ({report['total_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
