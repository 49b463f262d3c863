#!/usr/bin/env python3
"""Evaluate a U-Net model on a prepared dataset (the original evaluation_cmd.py, working).

Pixel accuracy, mean IoU, precision/recall at thresholds 0..1 (step 0.05), ROC AUC, object-level
precision and recall (26-connected components) and the best global-threshold baseline, over all
chosen examples; writes report.txt, report.json and PR / example plots to --output-dir.
"""

from __future__ import annotations

from typing import Optional

import typer

from _cli import Progress, VersionOption, app_for, run, set_gpu_memory_growth

HELP = __doc__.strip().splitlines()[0]


def evaluate_unet(
    dataset: str = typer.Option(..., "--dataset-file", "--dataset", help="Evaluation dataset .h5 (from prepare_dataset.py; masks uncropped)."),
    model_path: str = typer.Option(..., "--model-path", "--model", "-m", help="Model .h5 (a checkpoint of train_unet.py or the published model)."),
    output_dir: str = typer.Option(..., "--output-dir", help="Reports and plots."),
    verbose: bool = typer.Option(False, "--verbose", help="Show progress and print the text report."),
    model_shape: Optional[str] = typer.Option(None, "--model_shape", "--model-shape", help="Model output x,y,z the masks are cropped to; checked against the model (default: derived)."),
    model_input_shape: Optional[str] = typer.Option(None, "--tile-shape", "--model_input_shape", "--model-input-shape", help="Model input x,y,z (default: the example size)."),
    with_occlusions: bool = typer.Option(False, "--with-occlusions", help="Occlude the inputs with one zeroed cube each."),
    occlusion_size: int = typer.Option(40, "--occlusion-size", min=1, help="Edge of the occluding cube."),
    n_examples: int = typer.Option(40, "--n-examples", min=0, help="Examples drawn at random (seeded); 0 = all."),
    keys_file: Optional[str] = typer.Option(None, "--keys-file", help="Evaluate these keys: a JSON list, or a training <name>_split.json (its validation keys)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the example choice and the occlusions."),
    visualization_interval: int = typer.Option(10, "--visualization-interval", min=0, help="Plot every n-th example (0: none)."),
    object_threshold: float = typer.Option(0.5, "--object-threshold", min=0.0, max=1.0, help="Probability above which voxels form predicted objects."),
    set_gpu_mem_growth: bool = typer.Option(False, "--set_gpu_mem_growth", "--set-gpu-mem-growth", help="Let TensorFlow grow GPU memory as needed."),
    version: bool = VersionOption,
) -> None:
    from exllsm_neuronseg.geometry import parse_xyz
    from exllsm_neuronseg.metrics import evaluate_model, read_keys_file

    if set_gpu_mem_growth:
        set_gpu_memory_growth()
    bar = Progress("example", enabled=verbose)
    report = evaluate_model(
        model_path,
        dataset,
        output_dir,
        n_examples=n_examples,
        keys=read_keys_file(keys_file) if keys_file else None,
        seed=seed,
        model_input_shape=parse_xyz(model_input_shape, "--model_input_shape", minimum=1) if model_input_shape else None,
        model_output_shape=parse_xyz(model_shape, "--model_shape", minimum=1) if model_shape else None,
        occlusions=with_occlusions,
        occlusion_size=occlusion_size,
        visualization_interval=visualization_interval,
        object_threshold=object_threshold,
        progress=bar,
    )
    bar.close()
    if verbose:
        typer.echo(report.to_text())
    typer.echo(report.summary())


app = app_for(evaluate_unet, HELP)

if __name__ == "__main__":
    run(app)
