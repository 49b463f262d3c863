#!/usr/bin/env python3
"""Compute the intensity scaling factor of a volume from sampled tiles.

Drop-in for the original volumeScalingFactor.py. The last line is the host pipeline's contract:
"Calculated a scaling factor of <value> based on <n>/<total> tiles" (value: a float, nan or null).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from _cli import VersionOption, app_for, run

HELP = __doc__.strip().splitlines()[0]


def scaling_factor(
    input: str = typer.Option(..., "-i", "--input", help="Input container (N5 or zarr)."),
    data_set: str = typer.Option("/s0", "-id", "--input-dataset", "--input_data_set", "-d", "--data_set", "--dataset", help="Dataset path inside the container (-d/--data_set: the original's name)."),
    n_tiles: Optional[int] = typer.Option(None, "-n", "--n_tiles", "--n-tiles", min=0, help="Number of tiles to sample (at most all)."),
    percent_tiles: Optional[float] = typer.Option(None, "-p", "--percent_tiles", "--fraction-tiles", min=0.0, help="Fraction of tiles to sample (0.1 = 10%), used when -n is absent."),
    partition_size: str = typer.Option("200,200,200", "--partition_size", "--partition-size", help="Tile size x,y,z."),
    scaling_plots_dir: Optional[Path] = typer.Option(None, "--scaling_plots_dir", "--scaling-plots-dir", help="Write one fit plot per tile here."),
    start: Optional[str] = typer.Option(None, "--start", help="Region start x,y,z (default 0,0,0)."),
    end: Optional[str] = typer.Option(None, "--end", help="Region end x,y,z, exclusive (default: image shape)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Seed of the tile choice (default: a fresh one, printed)."),
    version: bool = VersionOption,
) -> None:
    import time

    from exllsm_neuronseg.geometry import check_block, format_xyz, parse_xyz, rectangular_tiles
    from exllsm_neuronseg.scaling import choose_tiles, sample_scaling
    from exllsm_neuronseg.volume import open_volume

    t0 = time.perf_counter()
    volume = open_volume(input, data_set)
    typer.echo(f"Read image {volume.container} {data_set} of size ({format_xyz(volume.shape)})")
    region = check_block(
        parse_xyz(start, "--start") if start is not None else (0, 0, 0),  # "" is an error, not a default
        parse_xyz(end, "--end") if end is not None else volume.shape,
        volume.shape,
    )
    tiles = rectangular_tiles(region.start, region.end, parse_xyz(partition_size, "--partition_size", minimum=1))
    if seed is None:  # a fresh one, printed, so this run can be repeated exactly with --seed
        import secrets

        seed = secrets.randbelow(2**31)
        typer.echo(f"Random seed {seed} (repeat this choice of tiles with --seed {seed})")
    chosen = choose_tiles(len(tiles), n_tiles, percent_tiles, seed)
    typer.echo(f"Select {len(chosen)} random tiles out of {len(tiles)}")
    if not len(chosen):
        typer.echo(
            f"warning: {percent_tiles} of {len(tiles)} tiles is less than one tile: no factor (null) from this region",
            err=True,
        )
    if scaling_plots_dir is not None:
        scaling_plots_dir.mkdir(parents=True, exist_ok=True)
    result = sample_scaling(
        tiles,
        volume.read_finite,  # NaN or infinite voxels are an error, not a skewed histogram
        chosen,
        plot_path=(lambda t: scaling_plots_dir / f"{t.start[0]}_{t.start[1]}_{t.start[2]}_expFit.png")
        if scaling_plots_dir
        else None,
        on_tile=lambda i, tile, f: typer.echo(f"Scaling factor for tile {i}: {tile} -> {f}"),
    )
    if not result.factors:
        typer.echo("No scaling factor could be computed for any of the selected tiles")
    else:
        dropped = len(result.factors) - len(result.valid_factors)
        typer.echo(f"tile-wise scaling factors {result.factors} ({dropped} without a usable histogram slope dropped)")
    typer.echo(f"Completed scaling factor computation in {time.perf_counter() - t0:.1f} seconds")
    typer.echo(result.summary_line())


app = app_for(scaling_factor, HELP)

if __name__ == "__main__":
    run(app)
