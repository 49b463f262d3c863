#!/usr/bin/env python3
"""Segment blocks [start, end) of an N5/zarr volume with the ExLLSM neuron U-Net.

Drop-in for the original volumeSegmentation.py: every original flag works with the same long and
short names; kebab-case aliases are accepted too. Several blocks run in one process (one model
load) with repeated --start/--end pairs, or --blocks FILE --block-index LIST from plan_blocks.py;
each block keeps its own done marker and prints its own summary line.
"""

from __future__ import annotations

import typer
from _cli import (
    BlockIndexOption,
    BlocksOption,
    EndOption,
    Progress,
    StartOption,
    VersionOption,
    app_for,
    chosen_blocks,
    fail,
    run,
    set_gpu_memory_growth,
)

HELP = __doc__.strip().splitlines()[0]


def segment_volume(
    input: str = typer.Option(..., "-i", "--input", help="Input container (N5 or zarr)."),
    input_dataset: str = typer.Option("/s0", "-id", "--input_data_set", "--input-dataset", help="Dataset path inside the input container."),
    output: str = typer.Option(..., "-o", "--output", help="Output container (its dataset must exist: create_volume.py)."),
    output_dataset: str = typer.Option("/s0", "-od", "--output_data_set", "--output-dataset", help="Dataset path inside the output container."),
    model_path: str = typer.Option(..., "-m", "--model_path", "--model", help="U-Net model file (.h5)."),
    scaling: str | None = typer.Option(None, "-s", "--scaling", metavar="FACTOR", help="Intensity scaling factor (from scaling_factor.py). Without it the block computes its own, which makes seams."),
    start: list[str] | None = StartOption,
    end: list[str] | None = EndOption,
    blocks: str | None = BlocksOption,
    block_index: str = BlockIndexOption,
    image_shape: str | None = typer.Option(None, "--image_shape", "--image-shape", help="Volume shape x,y,z; read from the data, checked if given."),
    model_input_shape: str | None = typer.Option(None, "--model_input_shape", "--model-input-shape", "--tile-shape", help="Tile input shape x,y,z (each edge s = 4 mod 8, s >= 92), or 'auto' (the default): 348,348,220 capped to the image, ~25% less work per voxel than 220^3. The result does not depend on it beyond float rounding."),
    model_output_shape: str | None = typer.Option(None, "--model_output_shape", "--model-output-shape", help="Tile output shape x,y,z (input - 88), or 'auto'; checked against the input shape if both are given."),
    set_gpu_mem_growth: bool = typer.Option(False, "--set_gpu_mem_growth", "--set-gpu-mem-growth", help="Let TensorFlow grow GPU memory as needed."),
    with_post_processing: bool = typer.Option(False, "--with_post_processing", "--with-post-processing", help="Hysteresis, then small-object removal, inside this block alone: objects cut by its borders are judged by their part in it, so the result depends on the block cut (a warning says so)."),
    as_binary_mask: bool = typer.Option(False, "--as_binary_mask", "--as-binary-mask", help="Write argmax 0/1 (uint8) instead of the probability."),
    unet_batch_size: int = typer.Option(1, "--unet_batch_size", "--unet-batch-size", "--batch-size", min=1, help="Accepted for the original's command line; tiles run one at a time (each is already a large batch of work)."),
    high_threshold: float = typer.Option(0.98, "-ht", "--high_threshold", "--high-threshold", help="Hysteresis seed threshold, in [0, 1] and >= the low threshold."),
    low_threshold: float = typer.Option(0.2, "-lt", "--low_threshold", "--low-threshold", help="Hysteresis grow threshold, in [0, 1]."),
    small_region_probability_threshold: float = typer.Option(0.9, "--small_region_probability_threshold", "--small-region-probability-threshold", help="Binarisation threshold of the size filter, in [0, 1]."),
    small_region_size_threshold: int = typer.Option(1000, "--small_region_size_threshold", "--small-region-size-threshold", help="Components with fewer voxels are removed (>= 0)."),
    partial_volume: str | None = typer.Option(None, "--partial_volume", "--partial-volume", help="The processed region x0,y0,z0,dx,dy,dz (start and size, as the host pipeline gives it) this block was clipped to: the block may then start and end on the region's edges as well as on the output chunk grid."),
    allow_unaligned: bool = typer.Option(False, "--allow-unaligned", help="Allow a block not aligned to the output chunk grid. Such a block shares output chunks with its neighbours, so it holds an exclusive lock on the output (<output dataset>/.exllsm-unaligned.lock, flock) for its whole run: a second unaligned job on the same output stops at once with an error (exit 2) instead of running beside it; run unaligned blocks one after another, and not while aligned jobs write the same output."),
    redo: bool = typer.Option(False, "--redo", help="Segment even if the block's done marker says it is finished."),
    precision: str = typer.Option("fp32", "--precision", help="Compute precision: fp32 (default, the reference), bf16 (GPUs of compute capability 8+, and CPUs with AVX512_BF16 or AMX: about 2x faster, masks agree to ~0.01% of voxels) or fp16 (GPUs)."),
    mask: str | None = typer.Option(None, "--mask", help="Tissue mask CONTAINER:DATASET (any resolution, stretched over the image; nonzero = tissue): tiles with no tissue in the box they write are written as background (0) without the model. Not exact near the mask's edge; off by default."),
    skip_constant: bool = typer.Option(True, "--skip-constant/--no-skip-constant", help="Tiles whose whole input is one value (empty space, missing chunks) get the model's answer to that value without running it (same result up to float rounding); --no-skip-constant runs the model everywhere, for comparison."),
    cpus: int | None = typer.Option(None, "--cpus", min=1, help="CPUs to use: TensorFlow's threads, and the default of --io-threads (default: the CPUs this process may use, from its affinity mask and any cgroup CPU quota; the pipeline passes its task.cpus)."),
    io_threads: int | None = typer.Option(None, "--io-threads", min=1, help="Threads for chunk decoding and encoding (default: one per CPU, 2..8; more than 4 per CPU or 64 in all are capped, with a note)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    version: bool = VersionOption,
) -> None:
    import numpy as np

    from exllsm_neuronseg.errors import VolumeError
    from exllsm_neuronseg.geometry import format_xyz, parse_xyz, processed_region
    from exllsm_neuronseg.inference import check_precision_name
    from exllsm_neuronseg.scaling import parse_scaling_factor
    from exllsm_neuronseg.segment import PostProcessing, segment_blocks
    from exllsm_neuronseg.resources import set_cpus
    from exllsm_neuronseg.volume import open_volume, open_volume_spec

    set_cpus(cpus)  # before anything starts TensorFlow
    check_precision_name(precision)
    source = open_volume(input, input_dataset)
    if image_shape is not None and parse_xyz(image_shape, "--image_shape") != source.shape:
        fail(f"--image_shape {image_shape} disagrees with {source}, which has shape {format_xyz(source.shape)}")
    chosen = chosen_blocks(start, end, blocks, block_index, source.shape)
    region = processed_region(partial_volume, source.shape)  # the whole image without --partial_volume
    tissue = open_volume_spec(mask, "the mask") if mask is not None else None
    try:
        target = open_volume(output, output_dataset, mode="r+")
    except VolumeError as exc:
        fail(f"{exc}; create the output dataset first with create_volume.py")
    if set_gpu_mem_growth:
        set_gpu_memory_growth()
    # checked whether or not post-processing is on: a bad threshold is a mistake either way
    thresholds = PostProcessing(high_threshold, low_threshold, small_region_probability_threshold, small_region_size_threshold)
    post = thresholds if with_post_processing else None
    tile_in = parse_xyz(model_input_shape, "--model_input_shape") if model_input_shape not in (None, "auto") else None
    tile_out = parse_xyz(model_output_shape, "--model_output_shape") if model_output_shape not in (None, "auto") else None
    voxels = float(sum(np.prod(np.subtract(e, s)) for s, e in chosen))
    bar = Progress("tile", total_voxels=voxels, enabled=progress)

    def report(result) -> None:
        bar.close()  # the summary line on its own line; the bar comes back with the next tile
        typer.echo(result.summary())

    results = segment_blocks(
        source,
        target,
        model_path,
        chosen,
        scaling=parse_scaling_factor(scaling) if scaling is not None else None,
        input_shape=tile_in,
        output_shape=tile_out,
        batch_size=unet_batch_size,
        binary=as_binary_mask,
        precision=precision,
        post_processing=post,
        allow_unaligned=allow_unaligned,
        region=region,
        skip_done=not redo,
        io_threads=io_threads,
        skip_constant=skip_constant,
        mask=tissue,
        progress=bar,
        on_result=report,
        warn=lambda message: typer.echo(f"warning: {message}", err=True),
    )
    bar.close()
    if len(results) > 1:
        done = [r for r in results if not r.skipped]
        seconds = sum(r.seconds for r in results)
        typer.echo(
            f"{len(results)} blocks: {len(done)} segmented, {len(results) - len(done)} already done, "
            f"{sum(r.tiles for r in done)} tiles ({sum(r.skipped_tiles for r in done)} without the model) in {seconds:.1f} s"
        )


app = app_for(segment_volume, HELP)

if __name__ == "__main__":
    run(app)
