#!/usr/bin/env python3
"""Write synthetic ground-truth regions (tubes labelled, equally bright puncta not) for training.

Each region is <output-dir>/<name>/<name>.h5 with the raw image (uint16) and the label (uint8) in
the dataset layout prepare_dataset.py reads (default t0/channel0 and t0/channel2).
"""

from __future__ import annotations

import typer

from _cli import VersionOption, app_for, run

HELP = __doc__.strip().splitlines()[0]


def make_training_regions(
    output_dir: str = typer.Option(..., "--output-dir", "--region-dir", help="Directory the regions are written to (becomes prepare_dataset.py's --region-dir)."),
    names: str = typer.Option("A1,A2,B1", "--names", "--regions", help="Comma-separated region names."),
    shape: str = typer.Option("256,256,256", "--shape", help="Region shape x,y,z."),
    n_tubes: int = typer.Option(12, "--n-tubes", min=0, help="Neurite-like tubes per region (labelled)."),
    n_puncta: int = typer.Option(300, "--n-puncta", min=0, help="Puncta per region, as bright as the tubes (not labelled)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Region i uses seed + i."),
    raw_dataset: str = typer.Option("t0/channel0", "--raw-dataset", help="Dataset of the raw image."),
    label_dataset: str = typer.Option("t0/channel2", "--label-dataset", help="Dataset of the ground truth."),
    version: bool = VersionOption,
) -> None:
    import time

    from exllsm_neuronseg.geometry import format_xyz, parse_xyz
    from exllsm_neuronseg.training_data import write_synthetic_regions

    t0 = time.perf_counter()
    region_names = [n.strip() for n in names.split(",") if n.strip()]
    size = parse_xyz(shape, "--shape", minimum=1)
    regions = write_synthetic_regions(
        output_dir, region_names, size, n_tubes, n_puncta, seed, raw_dataset, label_dataset
    )
    typer.echo(
        f"wrote {len(regions)} synthetic region(s) [{','.join(r.name for r in regions)}] of {format_xyz(size)} "
        f"to {output_dir} ({n_tubes} tubes, {n_puncta} puncta each; seed {seed}) in {time.perf_counter() - t0:.1f} s"
    )


app = app_for(make_training_regions, HELP)

if __name__ == "__main__":
    run(app)
