#!/usr/bin/env python3
"""Write blocks of final labels (uint64), or of globally post-processed probabilities (float32) or masks (uint8), into an output dataset.

With --records DIR (label_blocks.py, then merge_labels.py) each block is labelled again and mapped
through the merge table: the labels equal scipy.ndimage.label of the whole thresholded volume after
the size filter. With --post-processing HYSTERESIS_DIR SIZE_DIR (two merged passes: hysteresis,
then the size pass restricted to it) the input's probabilities (or 0/1 mask) are written where both
kept them: equal to post-processing the whole volume at once. The output dataset must exist
(create_volume.py --dtype uint64; float32 for probabilities, uint8 for a mask) with the input's dims, and the blocks must be blocks of the merged plan,
aligned to its chunks. Several blocks run in one process (repeated --start/--end pairs, or --blocks
FILE --block-index LIST); each gets a done marker, so a re-run skips finished blocks (--redo
writes them again).
"""

from __future__ import annotations

import typer
from _cli import BlockIndexOption, BlocksOption, EndOption, StartOption, VersionOption, app_for, chosen_blocks, fail, run

HELP = __doc__.strip().splitlines()[0]


def write_labels(
    input: str = typer.Option(..., "-i", "--input", help="Input container (N5 or zarr) the records were made from."),
    input_dataset: str = typer.Option("/s0", "-id", "--input_data_set", "--input-dataset", help="Dataset path the records were made from."),
    records: str | None = typer.Option(None, "--records", help="Records folder of one merged pass: write its labels."),
    post_processing: tuple[str, str] | None = typer.Option(None, "--post-processing", help="HYSTERESIS_DIR SIZE_DIR: records folders of the two merged post-processing passes: write post-processed probabilities (a uint8 mask for a uint8 input)."),
    output: str = typer.Option(..., "-o", "--output", help="Output container (its dataset must exist: create_volume.py)."),
    output_dataset: str = typer.Option("/s0", "-od", "--output_data_set", "--output-dataset", help="Dataset path inside the output container: uint64 (labels); float32, or uint8 for a 0/1 mask input (post-processing)."),
    start: list[str] | None = StartOption,
    end: list[str] | None = EndOption,
    blocks: str | None = BlocksOption,
    block_index: str = BlockIndexOption,
    redo: bool = typer.Option(False, "--redo", help="Write blocks even if their done marker says they are finished."),
    io_threads: int | None = typer.Option(None, "--io-threads", min=1, help="Threads for chunk decoding and encoding (default: cores, 2..8)."),
    version: bool = VersionOption,
) -> None:
    import time

    from exllsm_neuronseg.components import write_blocks
    from exllsm_neuronseg.errors import VolumeError
    from exllsm_neuronseg.geometry import check_block
    from exllsm_neuronseg.volume import io_executor, io_thread_count, open_volume

    if (records is None) == (post_processing is None):
        fail("give --records DIR (labels) or --post-processing HYSTERESIS_DIR SIZE_DIR (probabilities), one of them")
    volume = open_volume(input, input_dataset)
    boxes = [check_block(s, e, volume.shape) for s, e in chosen_blocks(start, end, blocks, block_index, volume.shape)]
    try:
        target = open_volume(output, output_dataset, mode="r+")
    except VolumeError as exc:
        fail(f"{exc}; create the output dataset first with create_volume.py")
    t = time.perf_counter()
    with io_executor(io_thread_count(io_threads, lambda m: typer.echo(f"warning: {m}", err=True))) as executor:
        results = write_blocks(
            volume,
            target,
            boxes,
            records=records,
            post_processing=post_processing,
            executor=executor,
            skip_done=not redo,
            on_result=lambda result: typer.echo(result.summary()),
        )
    if len(results) > 1:
        done = [r for r in results if not r.skipped]
        typer.echo(
            f"{len(results)} blocks: {len(done)} written, {len(results) - len(done)} already done, "
            f"{sum(r.voxels for r in done)} voxels in {time.perf_counter() - t:.1f} s"
        )


app = app_for(write_labels, HELP)

if __name__ == "__main__":
    run(app)
