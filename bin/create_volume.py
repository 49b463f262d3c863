#!/usr/bin/env python3
"""Create the output dataset of a segmentation before its blocks run in parallel.

It takes the input's dims and chunk size (N5 blockSize) and its resolution attributes; dtype is
float32 for probabilities, uint8 for binary masks or uint64 for labels (write_labels.py); gzip
compressed unless --compression says otherwise. An existing dataset of the same dims, chunks and
dtype is kept (so re-runs keep finished blocks, and its own compression); anything else is an error
unless --overwrite is given, which replaces it. The output can never be the input dataset itself.

Every dataset it makes gets a new creation identity (a kept one keeps its own, or gets one if it
has none), and appears at its path only once complete. Blocks still writing into a dataset that
--overwrite replaces then fail instead of marking themselves done.
"""

from __future__ import annotations

import typer
from _cli import VersionOption, app_for, fail, overwrite_hint, run

HELP = __doc__.strip().splitlines()[0]


def create_volume(
    input: str = typer.Option(..., "-i", "--input", "-t", help="Template (input) container."),
    input_dataset: str = typer.Option("/s0", "-id", "--input_data_set", "--input-dataset", "--template_data_set", help="Template dataset path."),
    output: str = typer.Option(..., "-o", "--output", help="Output container (created if missing; N5 unless named *.zarr)."),
    output_dataset: str = typer.Option("/s0", "-od", "--output_data_set", "--output-dataset", "--target_data_set", help="Output dataset path."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (probabilities), uint8 (binary masks) or uint64 (labels of write_labels.py)."),
    as_binary_mask: bool = typer.Option(False, "--as_binary_mask", "--as-binary-mask", help="Shorthand for --dtype uint8."),
    chunks: str | None = typer.Option(None, "--chunks", help="Chunk size x,y,z (default: the input's)."),
    compression: str = typer.Option("gzip", "--compression", "--n5_compression", help="N5 compression: gzip, raw, bzip2 (bz2), xz (lzma) or blosc (the host's n5_compression)."),
    compression_level: int | None = typer.Option(None, "--compression-level", "--compression_level", help="Codec level (default gzip 1, bzip2 9, xz 6, blosc 5; raw takes none). Probability maps shrink only ~10% at any gzip level, and level 1 encodes ~1.4x faster than 6."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset of other dims, chunks or dtype (its data is lost); an identical one is kept."),
    version: bool = VersionOption,
) -> None:
    from exllsm_neuronseg.codecs import compressor, describe
    from exllsm_neuronseg.errors import OutputError, OutputExistsError
    from exllsm_neuronseg.geometry import format_xyz, parse_xyz
    from exllsm_neuronseg.provenance import ATTRIBUTE as PROVENANCE
    from exllsm_neuronseg.provenance import stage_record
    from exllsm_neuronseg.volume import create_volume as create
    from exllsm_neuronseg.volume import dataset_exists, input_attributes, open_volume, same_dataset

    if as_binary_mask:
        dtype = "uint8"
    if dtype not in ("float32", "uint8", "uint64"):
        raise OutputError(f"--dtype {dtype!r} is not supported: use float32 (probabilities), uint8 (binary masks) or uint64 (labels)")
    compressor(compression, compression_level)  # a bad name or level fails before anything is read
    template = open_volume(input, input_dataset)
    if same_dataset(input, input_dataset, output, output_dataset):
        raise OutputError(f"the output {output}:{output_dataset} is the input dataset itself: choose another output dataset")
    existed = dataset_exists(output, output_dataset)
    chunk_shape = parse_xyz(chunks, "--chunks", minimum=1) if chunks else template.chunks
    try:
        volume = create(
            output,
            output_dataset,
            template.shape,
            chunk_shape,
            dtype,
            attributes={
                **input_attributes(template),
                PROVENANCE: stage_record("create_volume", {"dtype": dtype, "chunks": list(chunk_shape)}, template),
            },
            compression=compression,
            compression_level=compression_level,
            overwrite=overwrite,
        )
    except OutputExistsError as exc:
        fail(f"{exc} ({overwrite_hint()})")
    typer.echo(
        f"dataset {volume}{' (existing, kept)' if existed else ''}: shape {format_xyz(volume.shape)}, "
        f"chunks {format_xyz(volume.chunks)}, {volume.dtype}, {describe(volume.array.compressor)}"
    )


app = app_for(create_volume, HELP)

if __name__ == "__main__":
    run(app)
