#!/usr/bin/env python3
"""Label the connected components of blocks of a volume and write each block's record for merge_labels.py.

Foreground is value > --threshold, or value >= --threshold with --inclusive (the host's Spark
connected components; probabilities, or a 0/1 mask), labelled with 6- or 26-connectivity
(the host's connected_pixels_shape diamond/box) in each block alone; the block's record (objects,
their statistics and the block's faces) goes to --records DIR, written whole or not at all. Several
blocks run in one process: repeated --start/--end pairs, or --blocks FILE --block-index LIST from
plan_blocks.py. Then merge_labels.py joins them across blocks and write_labels.py writes the labels.
"""

from __future__ import annotations

import typer
from _cli import BlockIndexOption, BlocksOption, EndOption, StartOption, VersionOption, app_for, chosen_blocks, read_plan, run

HELP = __doc__.strip().splitlines()[0]


def label_blocks(
    input: str = typer.Option(..., "-i", "--input", help="Input container (N5 or zarr)."),
    input_dataset: str = typer.Option("/s0", "-id", "--input_data_set", "--input-dataset", help="Dataset path: probabilities, or a 0/1 mask."),
    records: str = typer.Option(..., "--records", help="Folder of the blocks' records (created if missing); one per pass."),
    threshold: float = typer.Option(0.8, "--threshold", help="Foreground is value > threshold (>= with --inclusive; the host's connected_pixels_threshold)."),
    inclusive: bool = typer.Option(False, "--inclusive", help="Foreground is value >= threshold, as the host's Spark connected components (default: >, as post-processing)."),
    connectivity: str = typer.Option("26", "--connectivity", help="6 (or diamond: faces) or 26 (or box: faces, edges, corners); the host's connected_pixels_shape."),
    seed_threshold: float | None = typer.Option(None, "--seed-threshold", help="Hysteresis: note which objects hold a voxel > this (merge_labels.py --require-seed keeps only those)."),
    restrict: str | None = typer.Option(None, "--restrict", help="Records folder of an earlier, merged pass: only voxels of the objects it kept are foreground (global post-processing's size pass)."),
    start: list[str] | None = StartOption,
    end: list[str] | None = EndOption,
    blocks: str | None = BlocksOption,
    block_index: str = BlockIndexOption,
    io_threads: int | None = typer.Option(None, "--io-threads", min=1, help="Threads for chunk decoding (default: cores, 2..8)."),
    version: bool = VersionOption,
) -> None:
    import time
    from pathlib import Path

    from exllsm_neuronseg.components import PassSettings, check_grid, checked_table, connectivity_of, write_block_record
    from exllsm_neuronseg.geometry import check_block
    from exllsm_neuronseg.volume import io_executor, io_thread_count, open_volume

    volume = open_volume(input, input_dataset)
    if restrict is not None:  # absolute: the records name the earlier pass for later stages run from elsewhere
        restrict = str(Path(restrict).resolve())
    settings = PassSettings(threshold, connectivity_of(connectivity), seed_threshold, restrict, inclusive)
    if restrict is not None:
        checked_table(volume, restrict)  # merged, from this input: refused before any block is labelled
    if blocks is not None:
        check_grid(read_plan(blocks), volume.box)  # the merge needs a grid: say so now
    boxes = [check_block(s, e, volume.shape) for s, e in chosen_blocks(start, end, blocks, block_index, volume.shape)]
    t_all, objects = time.perf_counter(), 0
    with io_executor(io_thread_count(io_threads, lambda m: typer.echo(f"warning: {m}", err=True))) as executor:
        for box in boxes:
            t = time.perf_counter()
            n = write_block_record(volume, box, settings, records, executor)
            objects += n
            typer.echo(f"block {box}: {n} objects, record written in {time.perf_counter() - t:.1f} s")
    if len(boxes) > 1:
        typer.echo(f"{len(boxes)} blocks: {objects} objects in blocks in {time.perf_counter() - t_all:.1f} s")


app = app_for(label_blocks, HELP)

if __name__ == "__main__":
    run(app)
