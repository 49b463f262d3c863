#!/usr/bin/env python3
"""Train the ExLLSM neuron U-Net on a prepared dataset (the original training_cmd.py, working).

Checkpoints <model-name><epoch>.h5 every epoch and <model-name>_best.h5 load in segment_volume.py
as they are; each checkpoint is committed together with its .state.npz (optimizer, dropout
generators, epoch, history), so --resume continues the newest complete one exactly.
"""

from __future__ import annotations

from typing import Optional

import typer

from _cli import Progress, VersionOption, app_for, fail, run, set_gpu_memory_growth

HELP = __doc__.strip().splitlines()[0]


def train_unet(
    training_dataset: str = typer.Option(..., "--dataset-file", "--training-dataset", help="Dataset .h5 from prepare_dataset.py."),
    output_dir: str = typer.Option(..., "--output-dir", help="Checkpoints, CSV log, split and plots."),
    model_name: str = typer.Option("resumed", "--model-name", help="Checkpoint prefix: <name><epoch>.h5, <name>_best.h5, <name>.log."),
    set_gpu_mem_growth: bool = typer.Option(False, "--set_gpu_mem_growth", "--set-gpu-mem-growth", help="Let TensorFlow grow GPU memory as needed."),
    resume: bool = typer.Option(False, "--resume", help="Continue from --pre-trained-model (default: the newest complete <name><epoch>.h5 in --output-dir)."),
    pre_trained_model: Optional[str] = typer.Option(None, "--pre-trained-model", help="Checkpoint to resume (its .state.npz restores optimizer, generators and epoch), or a model without one to fine-tune (fresh optimizer from epoch 1)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="A new run replaces an earlier run of --model-name in --output-dir (refused otherwise)."),
    initial_filters: int = typer.Option(4, "--initial-filters", min=1, help="Filters of the first convolution."),
    bottleneck_dropout_rate: float = typer.Option(0.2, "--bottleneck-dropout-rate", min=0.0, max=1.0, help="Dropout after the bottleneck convolutions."),
    spatial_dropout: bool = typer.Option(False, "--spatial-dropout", help="SpatialDropout3D in the down blocks."),
    spatial_dropout_rate: float = typer.Option(0.2, "--spatial-dropout-rate", min=0.0, max=1.0, help="Its rate."),
    n_blocks: int = typer.Option(2, "--n-blocks", min=1, help="Down and up blocks."),
    model_input_size: str = typer.Option("220,220,220", "--tile-shape", "--model_input_size", "--model-input-size", help="Network input x,y,z."),
    model_output_size: str = typer.Option("132,132,132", "--model_output_size", "--model-output-size", help="Network output x,y,z (checked against the input)."),
    library_size: Optional[str] = typer.Option(None, "--library_size", "--library-size", help="Stored example size x,y,z (default: read from the dataset; checked if given)."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", min=0.0, max=0.99, help="Validation fraction: ceil(f*N) examples, at least one left for training."),
    no_affine: bool = typer.Option(False, "--no-affine", help="Disable the rotation + scale augmentation."),
    with_elastic_deform: bool = typer.Option(False, "--with-elastic-deform", help="Elastic deformation (sigma 4 voxels, 5x5x5 grid)."),
    with_occlusions: bool = typer.Option(False, "--with-occlusions", help="Zero one cube of --occlusion-size per example."),
    occlusion_size: int = typer.Option(40, "--occlusion-size", "--occulsion-size", min=1, help="Edge of the occluding cube (voxels)."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Epochs to train in this run (numbered after a resumed checkpoint)."),
    object_class_weight: float = typer.Option(5.0, "--object-class-weight", min=0.0, help="Cross-entropy weight of the neuron class."),
    dice_weight: float = typer.Option(0.3, "--dice-weight", min=0.0, max=1.0, help="lambda: (1-lambda)*CE + lambda*dice."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Examples per step."),
    with_visualization_sample: bool = typer.Option(False, "--with-visualization-sample", help="Write sample<i>.png of augmented examples."),
    learning_rate: float = typer.Option(1e-3, "--learning-rate", min=0.0, help="Adam learning rate."),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch", min=1, help="Steps per epoch (default: one pass over the training examples)."),
    parallel_calls: Optional[int] = typer.Option(None, "--parallel-calls", min=1, help="Examples read and augmented in parallel (default: autotune)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Seed for split, initialisation and augmentation (random and printed if omitted; a resumed run reuses its own)."),
    progress: bool = typer.Option(False, "--progress/--no-progress", help="Per-step progress: a bar on a terminal, plain lines every 30 s in a log."),
    version: bool = VersionOption,
) -> None:
    import sys

    from exllsm_neuronseg.geometry import parse_xyz
    from exllsm_neuronseg.training import Augmentation, TrainingConfig, train
    from exllsm_neuronseg.unet import UNetConfig

    if pre_trained_model and not resume:
        fail("--pre-trained-model is only used with --resume")
    if set_gpu_mem_growth:
        set_gpu_memory_growth()
    # Keras' own bar writes escape codes: only on a terminal; a log gets plain step lines instead
    bar = progress and sys.stdout.isatty()
    config = TrainingConfig(
        epochs=epochs,
        batch_size=batch_size,
        test_fraction=test_fraction,
        object_class_weight=object_class_weight,
        dice_weight=dice_weight,
        learning_rate=learning_rate,
        input_shape=parse_xyz(model_input_size, "--model_input_size", minimum=1),
        output_shape=parse_xyz(model_output_size, "--model_output_size", minimum=1),
        library_size=parse_xyz(library_size, "--library_size", minimum=1) if library_size else None,
        augmentation=Augmentation(
            affine=not no_affine, elastic=with_elastic_deform, occlusions=with_occlusions, occlusion_size=occlusion_size
        ),
        seed=seed,
        parallel_calls=parallel_calls,
        steps_per_epoch=steps_per_epoch,
        model_name=model_name,
        verbose=1 if bar else 2,
    )
    unet = UNetConfig(
        n_blocks=n_blocks,
        initial_filters=initial_filters,
        bottleneck_dropout_rate=bottleneck_dropout_rate,
        spatial_dropout=spatial_dropout,
        spatial_dropout_rate=spatial_dropout_rate,
    )
    steps = Progress("step", enabled=progress and not bar)
    result = train(
        training_dataset, output_dir, unet, config, pre_trained_model, with_visualization_sample,
        resume=resume, overwrite=overwrite, progress=steps,
    )
    steps.close()
    typer.echo(result.summary())


app = app_for(train_unet, HELP)

if __name__ == "__main__":
    run(app)
