#!/usr/bin/env python3
"""Join the blocks' objects across block faces, number and size-filter them, and write the merge and object tables.

Every block of the plan (--blocks, from plan_blocks.py) must have its record in --records
(label_blocks.py), made with the same settings from the same input; objects touching across block
faces are joined, numbered 1, 2, ... by their first voxel in storage order (as scipy.ndimage.label
numbers the whole volume), and those under --min-size voxels dropped. The merge table it writes into
--records is what write_labels.py maps the blocks' labels through. --objects writes the table of
kept objects as CSV, with the same as JSON beside it.
"""

from __future__ import annotations

import typer
from _cli import VersionOption, app_for, read_plan, run

HELP = __doc__.strip().splitlines()[0]


def merge_labels(
    input: str = typer.Option(..., "-i", "--input", help="Input container (N5 or zarr) the records were made from."),
    input_dataset: str = typer.Option("/s0", "-id", "--input_data_set", "--input-dataset", help="Dataset path the records were made from."),
    blocks: str = typer.Option(..., "--blocks", help="Block plan file from plan_blocks.py: every one of its blocks must have a record."),
    records: str = typer.Option(..., "--records", help="Records folder of label_blocks.py; the merge table is written there."),
    min_size: int = typer.Option(2000, "--min-size", min=0, help="Objects with fewer voxels are dropped (the host's min_connected_pixels)."),
    require_seed: bool = typer.Option(False, "--require-seed", help="Drop objects without a voxel above the pass's --seed-threshold too (hysteresis)."),
    objects: str | None = typer.Option(None, "--objects", help="Write the kept objects' table here as CSV (e.g. objects.csv), and as JSON beside it (objects.json)."),
    version: bool = VersionOption,
) -> None:
    import time

    from exllsm_neuronseg.components import merge_records, object_table_paths, write_object_table
    from exllsm_neuronseg.volume import open_volume

    t = time.perf_counter()
    if objects is not None:
        object_table_paths(objects)  # a bad path fails before the merge writes its table
    volume = open_volume(input, input_dataset)
    plan = read_plan(blocks)
    result = merge_records(volume, plan, records, min_size=min_size, require_seed=require_seed)
    written = ""
    if objects is not None:
        about = {"input": str(volume), "records": records, "min_size": min_size, "require_seed": require_seed}
        csv_path, json_path = write_object_table(result, objects, about)
        written = f"; table {csv_path} and {json_path.name}"
    typer.echo(f"{result.summary()} in {time.perf_counter() - t:.1f} s, peak memory {peak_memory_mb():.0f} MB{written}")


def peak_memory_mb() -> float:
    """This process's peak resident memory: its own VmHWM (Linux), else ru_maxrss (which also counts
    what the parent held when it forked)."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


app = app_for(merge_labels, HELP)

if __name__ == "__main__":
    run(app)
