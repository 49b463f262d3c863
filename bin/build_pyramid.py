#!/usr/bin/env python3
"""Build a multiscale pyramid (s1, s2, ...) of an N5/zarr dataset <group>/s0 for BigDataViewer, n5-viewer, neuroglancer and napari.

Two steps, as a pipeline runs them: --create-only creates every level dataset (empty, each renamed
into place whole), sets the multiscale attributes and, with --plans-dir, writes each level's blocks
to DIR/s<k>.txt; then --level K computes blocks of level K from level K-1 (given as --start/--end
pairs or --blocks FILE --block-index LIST, in level K's voxels; default the whole level), one
summary line per block. Level K needs all of level K-1. Without either flag, both steps run here
for every level. Probabilities (float) are downsampled by max (default) or mean, labels and masks
(integers) by mode (default) or nearest; ids are never averaged. Re-runs skip blocks whose done
marker matches and whose source chunks are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import typer
from _cli import (
    BlockIndexOption,
    BlocksOption,
    EndOption,
    StartOption,
    VersionOption,
    app_for,
    chosen_blocks,
    fail,
    overwrite_hint,
    run,
)

HELP = __doc__.strip().splitlines()[0]


def build_pyramid(
    input: str = typer.Option(..., "-i", "--input", help="Container (N5 or zarr) holding the dataset; the levels are written beside it."),
    input_dataset: str = typer.Option("/s0", "-id", "--input_data_set", "--input-dataset", help="The full-resolution dataset, named s0, e.g. /connected/s0."),
    method: str | None = typer.Option(None, "--method", help="Downsampling: max (default) or mean for float probabilities; mode (default: ties to the smallest nonzero id) or nearest for integer labels and masks."),
    resolution: str | None = typer.Option(None, "--resolution", help="Voxel size x,y,z (the host's resolution param, e.g. 0.104,0.104,0.18) when s0 records none; s0's own wins. An anisotropic voxel keeps its coarse axis until the levels are about isotropic."),
    unit: str = typer.Option("um", "--unit", help="Unit of --resolution."),
    max_levels: int | None = typer.Option(None, "--max-levels", "--max_levels", help="At most this many levels (default: until a level fits in one chunk)."),
    partition_size: str = typer.Option("512", "--partition_size", "--partition-size", help="Block edge of a level's tasks, in its voxels: one number or x,y,z; rounded up to whole chunks."),
    create_only: bool = typer.Option(False, "--create-only", help="Create the level datasets and attributes only (and the plans with --plans-dir)."),
    level: int | None = typer.Option(None, "--level", help="Compute blocks of this level (1, 2, ...) from the level before; the levels must exist (--create-only)."),
    plans_dir: str | None = typer.Option(None, "--plans-dir", help="With --create-only: write each level's blocks to DIR/s<k>.txt (one x0,y0,z0,x1,y1,z1 per line)."),
    start: list[str] | None = StartOption,
    end: list[str] | None = EndOption,
    blocks: str | None = BlocksOption,
    block_index: str = BlockIndexOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace level datasets that differ from the plan, and remove levels beyond it."),
    redo: bool = typer.Option(False, "--redo", help="Compute blocks even if their done markers say they are finished."),
    io_threads: int | None = typer.Option(None, "--io-threads", min=1, help="Threads computing chunks (default: cores, 2..8); each holds one output and one source chunk."),
    version: bool = VersionOption,
) -> None:
    from exllsm_neuronseg.errors import OutputExistsError
    from exllsm_neuronseg.geometry import block_line, format_xyz
    from exllsm_neuronseg.pyramid import (
        build_level_blocks,
        build_pyramid,
        create_levels,
        level_blocks,
        open_level,
        plan_pyramid,
    )
    from exllsm_neuronseg.volume import open_volume

    if create_only and level is not None:
        fail("--create-only and --level are two steps: give one of them")
    if level is None and (start or end or blocks is not None or block_index != "all"):
        fail("--start/--end and --blocks select blocks of one level: give --level too")
    if plans_dir is not None and not create_only:
        fail("--plans-dir is written by --create-only")
    if level is not None:
        pair = open_level(input, input_dataset, level)
        chosen = chosen_blocks(start, end, blocks, block_index, pair.target.shape)
        results = build_level_blocks(
            pair, chosen, method, io_threads=io_threads, skip_done=not redo, on_result=lambda r: typer.echo(r.summary())
        )
        if len(results) > 1:
            typer.echo(_total(results))
        return

    source = open_volume(input, input_dataset)
    pyramid = plan_pyramid(
        source, method, resolution, unit, max_levels, warn=lambda message: typer.echo(f"warning: {message}", err=True)
    )
    if not pyramid.levels:
        typer.echo(f"{source} fits in one chunk ({format_xyz(source.chunks)}): no levels to build")
        return
    plans = {lv.index: level_blocks(lv, partition_size) for lv in pyramid.levels}  # a bad size fails before any write
    if plans_dir is not None and Path(plans_dir).exists() and not Path(plans_dir).is_dir():
        fail(f"--plans-dir {plans_dir} exists and is not a directory")
    if create_only:
        try:
            create_levels(pyramid, overwrite=overwrite)
        except OutputExistsError as exc:
            fail(f"{exc} ({overwrite_hint()})")
        if plans_dir is not None:
            _write_plans(Path(plans_dir), {k: [block_line(b) for b in p.blocks] for k, p in plans.items()})
        for lv in pyramid.levels:
            where = f" -> {Path(plans_dir) / f's{lv.index}.txt'}" if plans_dir is not None else ""
            typer.echo(
                f"{input}:/{lv.dataset}: shape {format_xyz(lv.shape)}, factors {format_xyz(lv.factors)} "
                f"(from s{lv.index - 1} by {format_xyz(lv.relative)}), {_count(len(plans[lv.index].blocks), 'block')}{where}"
            )
        return
    try:
        results = build_pyramid(
            pyramid, partition_size, overwrite=overwrite, io_threads=io_threads, skip_done=not redo,
            on_result=lambda r: typer.echo(r.summary()),
        )
    except OutputExistsError as exc:
        fail(f"{exc} ({overwrite_hint()})")
    typer.echo(f"{len(pyramid.levels)} levels ({pyramid.method}): " + _total(results))


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _total(results) -> str:
    done = [r for r in results if not r.skipped]
    return (
        f"{len(results)} blocks: {len(done)} computed, {len(results) - len(done)} already done, "
        f"{sum(r.written for r in done)} chunks written in {sum(r.seconds for r in results):.1f} s"
    )


def _write_plans(folder: Path, plans: dict[int, list[str]]) -> None:
    """Each level's block file whole or not at all (a temporary name, then renamed)."""
    from exllsm_neuronseg.errors import OutputError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror}") from exc
    for index, lines in plans.items():
        path = folder / f"s{index}.txt"
        temporary = path.with_name(path.name + ".partial")
        try:
            temporary.write_text("".join(line + "\n" for line in lines))
            temporary.replace(path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise OutputError(f"cannot write {path}: {exc.strerror}") from exc


app = app_for(build_pyramid, HELP)

if __name__ == "__main__":
    run(app)
