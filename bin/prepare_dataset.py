#!/usr/bin/env python3
"""Tile annotated regions into an HDF5 library of training examples (the original datasetPreparation_cmd.py).

Each region (HDF5 with a raw and a ground-truth dataset) gets its own intensity scaling factor, is
tiled like the segmentation, and samples-per-region tiles are drawn favouring tiles with neurons.
Examples are appended to --dataset-dir (a file, or a folder: <folder>/training-dataset.h5);
histograms and fit plots go to --output-dir. Every region is checked before anything is written,
and the dataset is replaced in one step at the end.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from _cli import VersionOption, app_for, fail, run

HELP = __doc__.strip().splitlines()[0]


def prepare_dataset(
    dataset_dir: str = typer.Option(..., "--dataset-file", "--dataset-dir", "--dataset", help="Output HDF5 dataset file (appended to; created if missing), or a folder to hold training-dataset.h5."),
    region_dir: Optional[str] = typer.Option(None, "--region-dir", help="Directory holding <R>/<R>.h5 (or <R>.h5) for each name in --regions."),
    regions: str = typer.Option("A1,A2,B1", "--regions", help="Comma-separated region names looked up in --region-dir."),
    region_file: Optional[List[str]] = typer.Option(None, "--region-file", metavar="FILE", help="A region HDF5 file (repeatable; named after the file stem). Used instead of --region-dir."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Diagnostics directory (histograms, scaling-fit plots); none written if omitted."),
    raw_dataset: str = typer.Option("t0/channel0", "--raw-dataset", help="Raw-image dataset inside each region file."),
    label_dataset: str = typer.Option("t0/channel2", "--label-dataset", help="Ground-truth dataset inside each region file (integers, > 0 = neuron)."),
    label_threshold: Optional[float] = typer.Option(None, "--label-threshold", help="Labels above this value are neuron (required for labels that are not whole numbers, e.g. probabilities)."),
    above_threshold_ratio: float = typer.Option(0.9, "--above-threshold-ratio", min=0.0, max=1.0, help="Target share of sampled tiles whose foreground fraction exceeds --threshold."),
    samples_per_region: int = typer.Option(50, "--samples-per-region", min=1, help="Examples drawn per region (capped at the candidate count)."),
    candidates: int = typer.Option(200, "--candidates", min=1, help="Tiles drawn uniformly per region before the weighted draw (all tiles if fewer)."),
    threshold: float = typer.Option(0.001, "--threshold", min=0.0, help="Foreground fraction above which a tile counts as 'high'."),
    tile_input_shape: str = typer.Option("220,220,220", "--tile-shape", "--tile-input-shape", "--model_input_size", help="Stored example (model input) shape x,y,z."),
    tile_output_shape: str = typer.Option("132,132,132", "--tile-output-shape", "--model_output_size", help="Tile stride / model output shape x,y,z."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Random seed (a random one is chosen and printed if omitted)."),
    version: bool = VersionOption,
) -> None:
    from exllsm_neuronseg.geometry import parse_xyz
    from exllsm_neuronseg.training_data import Region, find_regions
    from exllsm_neuronseg.training_data import prepare_dataset as prepare

    if region_file:
        from pathlib import Path

        chosen = [Region(Path(p).stem, Path(p), raw_dataset, label_dataset) for p in region_file]
        missing = [str(r.path) for r in chosen if not r.path.is_file()]
        if missing:
            fail(f"region file(s) not found: {', '.join(missing)}")
    elif region_dir:
        names = [n.strip() for n in regions.split(",") if n.strip()]
        chosen = find_regions(region_dir, names, raw_dataset, label_dataset)
    else:
        fail("give the regions with --region-dir (and --regions) or with --region-file")
    summary = prepare(
        chosen,
        dataset_dir,
        output_dir,
        parse_xyz(tile_input_shape, "--tile-input-shape", minimum=1),
        parse_xyz(tile_output_shape, "--tile-output-shape", minimum=1),
        above_threshold_ratio,
        samples_per_region,
        candidates,
        threshold,
        seed,
        label_threshold=label_threshold,
    )
    typer.echo(summary.summary())


app = app_for(prepare_dataset, HELP)

if __name__ == "__main__":
    run(app)
