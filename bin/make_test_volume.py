#!/usr/bin/env python3
"""Write a synthetic ExLLSM-like N5 volume: dark background, bright tubes and equally bright puncta."""

from __future__ import annotations

from typing import Optional

import typer

from _cli import VersionOption, app_for, run

HELP = __doc__.strip().splitlines()[0]


def make_test_volume(
    output: str = typer.Option(..., "-o", "--output", help="Output N5 container."),
    dataset: str = typer.Option("/c1/s0", "-d", "--dataset", help="Image dataset path."),
    shape: str = typer.Option("192,192,128", "--shape", help="Volume shape x,y,z."),
    chunks: str = typer.Option("64,64,64", "--chunks", help="Chunk size x,y,z."),
    label_dataset: Optional[str] = typer.Option(None, "--label-dataset", help="Also write the neuron label here."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed."),
    version: bool = VersionOption,
) -> None:
    from exllsm_neuronseg.geometry import parse_xyz
    from exllsm_neuronseg.synthetic import SyntheticSpec, write_synthetic_n5

    size = parse_xyz(shape, "--shape", minimum=1)
    scale = max(1, round((size[0] * size[1] * size[2] / 128**3) ** (1 / 3)))
    spec = SyntheticSpec(shape=size, n_tubes=6 * scale, n_puncta=30 * scale**3, seed=seed)
    write_synthetic_n5(output, dataset, spec, parse_xyz(chunks, "--chunks", minimum=1), label_dataset)
    typer.echo(f"wrote synthetic volume {output}:/{dataset.strip('/')} of shape {shape}")


app = app_for(make_test_volume, HELP)

if __name__ == "__main__":
    run(app)
