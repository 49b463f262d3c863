#!/usr/bin/env python3
"""Plan the blocks (one segmentation job each) and the scaling-factor sampling jobs of a volume.

Blocks are cells of the partition size (rounded up to whole output chunks) clipped to the processed
region (the host's partial_volume "x0,y0,z0,dx,dy,dz": start and size), so parallel jobs never
share a chunk; x fastest, then y, then z. One block per line of --output: "x0,y0,z0,x1,y1,z1"
(end-exclusive). One sampling job per line of --scaling_output: "x0,y0,z0,x1,y1,z1 FRACTION", the
fraction of its tiles the job samples (scaling_factor.py -p); empty when sampling is off (no
--scaling_tiles and no --scaling_fraction strictly between 0 and 1).
"""

from __future__ import annotations

from pathlib import Path

import typer
from _cli import VersionOption, app_for, run

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
    version: bool = VersionOption,
) -> None:
    from exllsm_neuronseg.errors import OutputError
    from exllsm_neuronseg.geometry import block_line, format_xyz, plan_scaling
    from exllsm_neuronseg.geometry import plan_blocks as plan
    from exllsm_neuronseg.volume import open_volume

    volume = open_volume(input, input_dataset)
    blocks = plan(volume.shape, volume.chunks, partition_size, partial_volume)
    scaling = plan_scaling(
        volume.shape, scaling_tiles, scaling_fraction, scaling_partition_size, max_scaling_tiles_per_job, partial_volume
    )
    for name in (output, scaling_output):
        if not name.strip() or Path(name).is_dir():
            raise OutputError(f"output file {name!r} is empty or a directory: give a file name, e.g. blocks.txt")
    if Path(output).resolve() == Path(scaling_output).resolve():
        raise OutputError(f"the blocks and the scaling jobs would both be written to {output}: give two files")
    lines = {
        Path(output): [block_line(b) for b in blocks.blocks],
        Path(scaling_output): [f"{format_xyz(j.start + j.end)} {scaling.fraction!r}" for j in scaling.jobs],
    }
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


app = app_for(plan_blocks, HELP)

if __name__ == "__main__":
    run(app)
