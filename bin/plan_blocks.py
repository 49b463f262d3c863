#!/usr/bin/env python3
"""Plan the blocks (one segmentation job each) and the scaling-factor sampling jobs of a volume.

Blocks are cells of the partition size (rounded up to whole output chunks) clipped to the processed
region (the host's partial_volume "x0,y0,z0,dx,dy,dz": start and size), so parallel jobs never
share a chunk; x fastest, then y, then z. One block per line of --output: "x0,y0,z0,x1,y1,z1"
(end-exclusive). One sampling job per line of --scaling_output: "x0,y0,z0,x1,y1,z1 FRACTION", the
fraction of its tiles the job samples (scaling_factor.py -p); empty when sampling is off (no
--scaling_tiles and no --scaling_fraction strictly between 0 and 1).

The run's cost, before any block runs (with --report, --plan-only or --measure-rate): blocks, voxels
to compute (less the tiles wholly in empty space, with --model: their input windows, context
included, hold no written input chunk), compute time per device from a rate (--rate-mvox-s, a
measured one with --measure-rate, or the README's CPU figure), output size on disk (uncompressed
and a gzip estimate). --report writes it as JSON; --plan-only prints it too. The plan files are
written in every case: they hold no data, and a dry run followed by a real run plans once.
"""

from __future__ import annotations

from pathlib import Path

import typer
from _cli import VersionOption, app_for, fail, run

HELP = __doc__.strip().splitlines()[0]


def plan_blocks(
    input: str = typer.Option(..., "-i", "--input", help="Input container (N5 or zarr)."),
    input_dataset: str = typer.Option("/s0", "-id", "--input_data_set", "--input-dataset", help="Dataset path inside the container: its dims and chunks are used."),
    partition_size: str = typer.Option("512", "--partition_size", "--partition-size", help="Block edge: one number or x,y,z; rounded up to a multiple of the chunk size."),
    partial_volume: str = typer.Option("", "--partial_volume", "--partial-volume", help="Processed region x0,y0,z0,dx,dy,dz (start and size; clipped to the image). Default: the whole image."),
    output: str = typer.Option("blocks.txt", "-o", "--output", help="Blocks file, one 'x0,y0,z0,x1,y1,z1' per line."),
    scaling_tiles: int = typer.Option(0, "--scaling_tiles", "--scaling-tiles", help="Number of sampling tiles for the scaling factor (wins over the fraction; 0 = use the fraction)."),
    scaling_fraction: float = typer.Option(0.0, "--scaling_fraction", "--scaling-fraction", help="Fraction of sampling tiles, used when strictly between 0 and 1."),
    scaling_partition_size: str = typer.Option("396,396,396", "--scaling_partition_size", "--scaling-partition-size", help="Sampling tile size x,y,z (or one number)."),
    max_scaling_tiles_per_job: int = typer.Option(40, "--max_scaling_tiles_per_job", "--max-scaling-tiles-per-job", min=1, help="About this many tiles are sampled per job."),
    scaling_output: str = typer.Option("scaling_jobs.txt", "--scaling_output", "--scaling-output", help="Sampling jobs file, one 'x0,y0,z0,x1,y1,z1 FRACTION' per line (empty when sampling is off)."),
    model_path: str | None = typer.Option(None, "-m", "--model_path", "--model", help="U-Net model file (.h5): its tile grid and context find the tiles wholly in empty space (reading it needs h5py, no TensorFlow)."),
    model_input_shape: str | None = typer.Option(None, "--model_input_shape", "--model-input-shape", "--tile-shape", help="Tile input shape x,y,z as segment_volume.py takes it, or 'auto' (its default for the image)."),
    as_binary_mask: bool = typer.Option(False, "--as_binary_mask", "--as-binary-mask", help="The output will be a uint8 0/1 mask (for its size on disk), not float32 probabilities."),
    rate_mvox_s: float | None = typer.Option(None, "--rate-mvox-s", "--rate_mvox_s", help="Segmentation rate of one device in Mvox/s, measured end to end (default 4.7: the README's fp32 figure on a 2-core CPU; a GPU is many times faster)."),
    measure_rate: bool = typer.Option(False, "--measure-rate", help="Time a few tiles of the model on this machine (seconds; loads TensorFlow) and estimate with that instead of --rate-mvox-s."),
    precision: str = typer.Option("fp32", "--precision", help="Precision for --measure-rate: fp32, bf16 or fp16, as segment_volume.py runs it."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Print the run's cost too (a dry run: nothing runs after the plan)."),
    report: str | None = typer.Option(None, "--report", help="Write the run's cost as JSON to this file."),
    version: bool = VersionOption,
) -> None:
    import json

    from exllsm_neuronseg.errors import OutputError
    from exllsm_neuronseg.geometry import block_line, format_xyz, parse_xyz, plan_scaling
    from exllsm_neuronseg.geometry import plan_blocks as plan
    from exllsm_neuronseg.plan_cost import check_rate, estimate_cost
    from exllsm_neuronseg.volume import open_volume

    volume = open_volume(input, input_dataset)
    blocks = plan(volume.shape, volume.chunks, partition_size, partial_volume)
    if measure_rate and model_path is None:
        fail("--measure-rate times tiles of the model: give --model too")
    if model_input_shape is not None and model_path is None:
        fail("--model_input_shape sets the model's tiles: give --model too")
    if measure_rate and rate_mvox_s is not None:
        fail("give either --rate-mvox-s or --measure-rate, not both")
    if rate_mvox_s is not None:
        check_rate(rate_mvox_s)
    if report is not None and (not report.strip() or Path(report).is_dir()):
        raise OutputError(f"report file {report!r} is empty or a directory: give a file name, e.g. plan.json")
    scaling = plan_scaling(
        volume.shape, scaling_tiles, scaling_fraction, scaling_partition_size, max_scaling_tiles_per_job, partial_volume
    )
    cost = None
    if report is not None or plan_only or measure_rate:  # before any file is written: a bad model writes nothing
        tile = parse_xyz(model_input_shape, "--model_input_shape") if model_input_shape not in (None, "auto") else None
        cost = estimate_cost(
            volume, blocks, model_path, tile, binary=as_binary_mask, rate_mvox_s=rate_mvox_s, measure=measure_rate, precision=precision
        )
        if cost.tile_seconds is not None:
            typer.echo(f"measured {cost.tile_seconds:.3g} s per tile ({precision}): {cost.rate_mvox_s:.3g} Mvox/s for this plan", err=True)
    for name in (output, scaling_output):
        if not name.strip() or Path(name).is_dir():
            raise OutputError(f"output file {name!r} is empty or a directory: give a file name, e.g. blocks.txt")
    if Path(output).resolve() == Path(scaling_output).resolve():
        raise OutputError(f"the blocks and the scaling jobs would both be written to {output}: give two files")
    if report is not None and Path(report).resolve() in (Path(output).resolve(), Path(scaling_output).resolve()):
        raise OutputError(f"the report would be written over the plan file {report}: give another file")
    lines = {
        Path(output): [block_line(b) for b in blocks.blocks],
        Path(scaling_output): [f"{format_xyz(j.start + j.end)} {scaling.fraction!r}" for j in scaling.jobs],
    }
    if cost is not None and report is not None:
        lines[Path(report)] = json.dumps(cost.as_dict(), indent=1).splitlines()
    for path, text in lines.items():  # each file whole or not at all (a full disk leaves no short list)
        temporary = path.with_name(path.name + ".partial")
        try:
            temporary.write_text("".join(line + "\n" for line in text))
            temporary.replace(path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
    jobs = f"{len(scaling.jobs)} scaling jobs"
    if scaling.active:
        jobs += f" of edge {scaling.job_edge}, each sampling {scaling.fraction:.4g} of its tiles ({scaling.n_tiles} in all)"
    typer.echo(
        f"planned {len(blocks.blocks)} blocks of {format_xyz(blocks.partition_size)} over region {blocks.region} "
        f"(chunks {format_xyz(blocks.chunks)}); {jobs}"
    )
    if plan_only and cost is not None:
        for line in cost.summary_lines():
            typer.echo(f"  {line}")


app = app_for(plan_blocks, HELP)

if __name__ == "__main__":
    run(app)
