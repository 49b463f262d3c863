#!/usr/bin/env python3
"""Benchmark: U-Net training throughput on this machine (220^3 inputs, batch 1 by default).

Three measurements, each after warm-up steps that are not counted:

* **compute**: ``fit`` on one in-memory example repeated (no input pipeline at all);
* **pipeline**: the training ``tf.data`` pipeline alone (HDF5 read + augmentation in a parallel
  ``map``), examples per second with the model idle;
* **end to end**: ``fit`` on the real pipeline, as ``train_unet.py`` runs it.

The input pipeline's share of the step time is ``1 - compute / end-to-end``: the time a step
loses to waiting for data and to the augmentation competing for the same cores.

    .venv/bin/python bench/bench_training.py [--size 220] [--steps 8] [--warmup 2] [--no-affine] [--elastic]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def make_dataset(path: Path, size: int, out: int, n_examples: int) -> None:
    from exllsm_neuronseg.training_data import prepare_dataset, write_synthetic_regions

    region = size + out  # 2 tiles per axis -> 8 candidate tiles
    regions = write_synthetic_regions(path.parent / "regions", ["B1"], (region,) * 3, n_tubes=20, n_puncta=400, seed=0)
    prepare_dataset(regions, path, None, (size,) * 3, (out,) * 3, samples_per_region=n_examples, seed=0)


class StepTimer:
    def __init__(self, warmup: int) -> None:
        import keras

        timer = self

        class _Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                timer.times.append(time.perf_counter())

        self.warmup = warmup
        self.times: list[float] = []
        self.callback = _Callback()

    def seconds_per_step(self) -> float:
        t = self.times[self.warmup - 1 :] if self.warmup > 0 else self.times
        return (t[-1] - t[0]) / (len(t) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=220, help="model input edge (output = size - 88 for 2 blocks)")
    parser.add_argument("--filters", type=int, default=4)
    parser.add_argument("--n-blocks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-affine", action="store_true")
    parser.add_argument("--elastic", action="store_true")
    parser.add_argument("--parallel-calls", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    import keras
    from exllsm_neuronseg.training import (
        Augmentation,
        ExampleLoader,
        training_dataset,
        training_metrics,
        weighted_cce_dice_loss,
    )
    from exllsm_neuronseg.training_data import ExampleLibrary
    from exllsm_neuronseg.unet import UNetConfig, build_unet, output_size

    out = output_size(args.size, args.n_blocks)
    if out is None:
        sys.exit(f"input edge {args.size} is not valid for {args.n_blocks} blocks")
    config = UNetConfig(n_blocks=args.n_blocks, initial_filters=args.filters)
    aug = Augmentation(affine=not args.no_affine, elastic=args.elastic)
    n_total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bench.h5"
        t = time.perf_counter()
        make_dataset(data, args.size, out, 8)
        print(f"dataset: 8 examples of {args.size}^3 in {time.perf_counter() - t:.1f} s", flush=True)
        library = ExampleLibrary(data)
        loader = ExampleLoader(library, library.keys, (args.size,) * 3, (out,) * 3, aug)

        def compiled():
            keras.utils.set_random_seed(0)
            model = build_unet((args.size,) * 3, config)
            model.compile(
                optimizer=keras.optimizers.Adam(), loss=weighted_cce_dice_loss(), metrics=training_metrics()
            )
            return model

        # 1. compute only
        image, mask = loader.plain(0)
        x = np.repeat(image[None, ..., None], args.batch_size, 0)
        y = np.repeat(np.eye(2, dtype=np.float32)[mask][None], args.batch_size, 0)
        model = compiled()
        timer = StepTimer(args.warmup)
        model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(), steps_per_epoch=n_total, epochs=1, verbose=0,
                  callbacks=[timer.callback])
        compute = timer.seconds_per_step()
        print(f"compute only: {compute:.3f} s/step", flush=True)

        # 2. input pipeline only
        it = iter(training_dataset(loader, args.batch_size, seed=0, parallel_calls=args.parallel_calls))
        for _ in range(args.warmup):
            next(it)
        t = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        pipeline = (time.perf_counter() - t) / args.steps
        del it
        print(f"input pipeline only: {pipeline:.3f} s/batch", flush=True)

        # 3. end to end
        model = compiled()
        timer = StepTimer(args.warmup)
        model.fit(training_dataset(loader, args.batch_size, seed=0, parallel_calls=args.parallel_calls),
                  steps_per_epoch=n_total, epochs=1, verbose=0, callbacks=[timer.callback])
        e2e = timer.seconds_per_step()
        library.close()

    results = {
        "device": "cpu",
        "cores": os.cpu_count(),
        "input": args.size,
        "output": out,
        "initial_filters": args.filters,
        "n_blocks": args.n_blocks,
        "batch_size": args.batch_size,
        "augmentation": {"affine": aug.affine, "elastic": aug.elastic},
        "timed_steps": args.steps,
        "compute_s_per_step": compute,
        "pipeline_s_per_batch": pipeline,
        "end_to_end_s_per_step": e2e,
        "steps_per_s": 1 / e2e,
        "examples_per_s": args.batch_size / e2e,
        "pipeline_share": max(0.0, 1 - compute / e2e),
    }
    print(
        f"training {args.size}^3 -> {out}^3, batch {args.batch_size}, F={args.filters}, {args.n_blocks} blocks, "
        f"affine {'on' if aug.affine else 'off'}, elastic {'on' if aug.elastic else 'off'}, {os.cpu_count()} cores: "
        f"{results['steps_per_s']:.3f} steps/s, {results['examples_per_s']:.3f} examples/s "
        f"(compute alone {1 / compute:.3f} steps/s; pipeline alone {args.batch_size / pipeline:.2f} examples/s; "
        f"input pipeline share of the step time {100 * results['pipeline_share']:.0f}%)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
