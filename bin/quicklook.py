#!/usr/bin/env python3
"""Write a quick-look PNG of a volume: max projections along z, y and x, a result overlaid in colour.

The input is grey (contrast from robust percentiles). A result of the same x,y,z dims is drawn over
it by kind: probability (float; red to yellow, opacity = p), mask (uint8 0/1; one colour) or labels
(other integers; a stable colour per id, the first object along each ray). Every voxel is read
once, chunk by chunk, so memory stays at a few chunks whatever the volume's size. The picture's
longest edge is --max-size pixels; its axes are in the input's pixelResolution unit when it has one.
"""

from __future__ import annotations

from typing import Optional

import typer

from _cli import Progress, VersionOption, app_for, run

HELP = __doc__.strip().splitlines()[0]


def quicklook(
    input: str = typer.Option(..., "-i", "--input", help="Input (raw) container, N5 or zarr."),
    input_dataset: str = typer.Option("/s0", "-id", "--input_data_set", "--input-dataset", help="Input dataset path inside the container."),
    result: Optional[list[str]] = typer.Option(None, "--result", metavar="CONTAINER:DATASET", help="Result CONTAINER:DATASET to overlay (same x,y,z dims as the input); repeat it for one picture per result."),
    kind: str = typer.Option("auto", "--kind", help="How the result is drawn: auto (float = probability, uint8 0/1 = mask, other integers = labels), probability, mask or labels."),
    output: str = typer.Option(..., "-o", "--output", help="The PNG file, or a folder (existing, or ending in '/') for pictures named after their results (seg.n5:/segmented/s0 -> seg_segmented_s0.png)."),
    max_size: int = typer.Option(1024, "--max-size", "--max_size", help="Longest edge of the picture in pixels (at least 256)."),
    io_threads: Optional[int] = typer.Option(None, "--io-threads", min=1, help="Threads for chunk decoding (default: cores, 2..8; fewer for chunks over ~256 MB)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    version: bool = VersionOption,
) -> None:
    import time

    from exllsm_neuronseg.geometry import format_xyz
    from exllsm_neuronseg.quicklook import write_quicklooks
    from exllsm_neuronseg.volume import io_thread_count, open_volume, open_volume_spec

    t0 = time.perf_counter()
    raw = open_volume(input, input_dataset)
    results = [open_volume_spec(spec, "--result") for spec in result or []]
    bar = Progress("chunks", enabled=progress)
    pictures = write_quicklooks(
        raw, results, output, kind=kind, max_size=max_size, threads=io_thread_count(io_threads), on_progress=bar
    )
    bar.close()
    seconds = time.perf_counter() - t0
    for picture in pictures:
        width, height = picture.size
        shown = f" + {picture.result} as {picture.kind}" if picture.result else ""
        typer.echo(
            f"picture {picture.path}: {width}x{height} px of {raw} ({format_xyz(raw.shape)}, "
            f"1 pixel = {'x'.join(map(str, picture.layout.factors))} voxels){shown} in {seconds:.1f} s"
        )


app = app_for(quicklook, HELP)

if __name__ == "__main__":
    run(app)
