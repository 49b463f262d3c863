#!/usr/bin/env python3
"""Copy an N5/zarr output into an OME-Zarr (NGFF 0.4, zarr v2) image with its labels, for napari, neuroglancer and Fiji.

The image is the input dataset (probabilities, float32); each --label NAME=CONTAINER:DATASET (binary
masks uint8, connected components uint64) becomes labels/NAME of it. A dataset named s0 whose group
holds s1, s2, ... (a pyramid) is copied level by level; the labels need the same levels. Axes are
z,y,x on disk (N5 lists x,y,z: the same array); the scale comes from pixelResolution or --resolution.
The OME-Zarr is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import typer
from _cli import Progress, VersionOption, app_for, fail, overwrite_hint, run

HELP = __doc__.strip().splitlines()[0]


def to_ome_zarr(
    input: str = typer.Option(..., "-i", "--input", help="Input container (N5 or zarr)."),
    input_dataset: str = typer.Option("/s0", "-id", "--input_data_set", "--input-dataset", help="The image dataset (e.g. probabilities /s0), or a group of levels s0, s1, ..."),
    label: list[str] | None = typer.Option(None, "--label", metavar="NAME=CONTAINER:DATASET", help="A label image NAME=CONTAINER:DATASET (NAME=DATASET: in the input container), e.g. mask=/data/seg.n5:/mask/s0; repeat for several."),
    output: str = typer.Option(..., "-o", "--output", help="The OME-Zarr directory to write, e.g. /data/seg.ome.zarr."),
    name: str | None = typer.Option(None, "--name", help="The image's name in the metadata (default: its dataset's group or container)."),
    chunks: str | None = typer.Option(None, "--chunks", help="Output chunk shape x,y,z (default: the input's, each edge at most 128)."),
    resolution: str | None = typer.Option(None, "--resolution", "--voxel-size", help="Voxel size x,y,z when the input has no pixelResolution (e.g. 0.104,0.104,0.18)."),
    unit: str | None = typer.Option(None, "--unit", help="Unit of --resolution (e.g. um, nm)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OME-Zarr image at --output."),
    io_threads: int | None = typer.Option(None, "--io-threads", min=1, help="Threads copying blocks (default: cores, 2..8)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    version: bool = VersionOption,
) -> None:
    from exllsm_neuronseg.errors import OutputExistsError
    from exllsm_neuronseg.geometry import parse_xyz
    from exllsm_neuronseg.omezarr import parse_label_spec, parse_voxel_size, write_ome_zarr

    labels = [parse_label_spec(spec, input) for spec in label or []]
    chunk_shape = parse_xyz(chunks, "--chunks", minimum=1) if chunks else None
    voxel_size = parse_voxel_size(resolution) if resolution else None
    bar = Progress("block", enabled=progress)
    try:
        result = write_ome_zarr(
            output,
            input,
            input_dataset,
            labels,
            name=name,
            chunks=chunk_shape,
            voxel_size=voxel_size,
            unit=unit,
            overwrite=overwrite,
            io_threads=io_threads,
            progress=bar,
            warn=lambda message: typer.echo(f"warning: {message}", err=True),
        )
    except OutputExistsError as exc:
        fail(f"{exc} ({overwrite_hint()})")
    bar.close()
    typer.echo(result.summary())


app = app_for(to_ome_zarr, HELP)

if __name__ == "__main__":
    run(app)
