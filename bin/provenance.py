#!/usr/bin/env python3
"""Print how a dataset was made: its creation record (stage, version, commit, image, source chain)
and the settings of its finished blocks (model, scaling, tile shape, precision, thresholds, mask)."""

from __future__ import annotations

import typer
from _cli import VersionOption, app_for, run

HELP = __doc__.strip().splitlines()[0]


def provenance(
    input: str = typer.Option(..., "-i", "--input", help="Container (N5 or zarr)."),
    input_dataset: str = typer.Option(..., "-id", "--input-dataset", "--input_data_set", help="Dataset path inside the container."),
    json_output: bool = typer.Option(False, "--json", help="Print the whole record as JSON instead of a summary."),
    version: bool = VersionOption,
) -> None:
    import json

    from exllsm_neuronseg.provenance import describe, read_provenance
    from exllsm_neuronseg.volume import open_volume

    record = read_provenance(open_volume(input, input_dataset))
    typer.echo(json.dumps(record, indent=1, default=str) if json_output else describe(record))


app = app_for(provenance, HELP)

if __name__ == "__main__":
    run(app)
