#!/usr/bin/env python3
"""Write a bioimage.io 0.5 model package (folder, or .zip) of a U-Net model file, for bioimage.io core, deepImageJ, ilastik and TensorFlow.

The package holds the weights as keras_hdf5 (the .h5 as is when the tile shape is its own) and as a
TensorFlow SavedModel, test tensors computed by this project on a synthetic volume, a README and the
licence. The input's per-volume scaling factor is declared as scale_linear with one example gain
(--scaling, default the test volume's own factor): the README says to replace it for each volume.
The package is built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import typer
from _cli import VersionOption, app_for, fail, overwrite_hint, run

HELP = __doc__.strip().splitlines()[0]


def export_model(
    model_path: str = typer.Option(..., "-m", "--model_path", "--model", help="U-Net model file (.h5): the published neuron_2021.h5 or one trained here."),
    output: str = typer.Option(..., "-o", "--output", help="The package: a folder, or a file ending in .zip."),
    tile_shape: str | None = typer.Option(None, "--tile-shape", "--model_input_shape", help="Input tile x,y,z of the exported graphs (each edge s = 4 mod 8, s >= 92; default: the model file's own, 220,220,220 for the published model)."),
    scaling: float | None = typer.Option(None, "-s", "--scaling", help="The example scaling factor declared as scale_linear gain (default: the test volume's own). Give your volume's factor (scaling_factor.py) to run the package on it."),
    name: str | None = typer.Option(None, "--name", help="The model's name (default: the published model's name, or the file's stem)."),
    author: list[str] | None = typer.Option(None, "--author", metavar="NAME", help="An author of the package (repeat for several; default: the exllsm-neuronseg contributors)."),
    license: str = typer.Option("BSD-3-Clause", "--license", help="SPDX identifier of the weights' licence."),
    license_file: str | None = typer.Option(None, "--license-file", help="The licence text to package (default: LICENSE-<model stem>.txt or LICENSE beside the model file)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model package at --output."),
    version: bool = VersionOption,
) -> None:
    from exllsm_neuronseg.errors import OutputExistsError
    from exllsm_neuronseg.geometry import parse_xyz
    from exllsm_neuronseg.model_package import export_model_package

    tile = parse_xyz(tile_shape, "--tile-shape") if tile_shape else None
    try:
        result = export_model_package(
            model_path,
            output,
            tile_shape=tile,
            scaling=scaling,
            name=name,
            authors=author or (),
            license=license,
            license_file=license_file,
            overwrite=overwrite,
            warn=lambda message: typer.echo(f"warning: {message}", err=True),
        )
    except OutputExistsError as exc:
        fail(f"{exc} ({overwrite_hint()})")
    typer.echo(result.summary())


app = app_for(export_model, HELP)

if __name__ == "__main__":
    run(app)
