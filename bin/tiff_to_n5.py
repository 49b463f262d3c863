#!/usr/bin/env python3
"""Convert a TIFF series (a folder of z slices, or one multi-page TIFF) into an N5 dataset, in x,y,z.

The host pipeline's tif_to_n5 command line works unchanged (-i -o -d -c --input_name_pattern
--subvol --compression; --distributed and --workers are accepted). Slices are sorted by the integer
that ends the file name: 2.tif before 12.tif, slice_0002.tif before slice_0012.tif; a name without a
trailing integer, two different name prefixes, or one index twice is an error; gaps in the indices
are stacked as consecutive z, with a warning. A single multi-page (Big)TIFF, given as -i or alone in
the folder, is a z stack. The N5 blockSize is -c as given, x,y,z.

Every slice header is checked before anything is written; the dataset is written under a temporary
name and renamed into place when complete. A re-run of the same conversion (same files, sizes,
mtimes, chunks, compression, subvolume) is skipped; another dataset at the target is replaced only
with --overwrite. A target that is the input folder, holds the input or lies inside it is refused.
The voxel size of ImageJ-calibrated TIFFs becomes N5 pixelResolution.
"""

from __future__ import annotations

import typer
from _cli import Progress, VersionOption, app_for, fail, overwrite_hint, run

# the whole docstring, one line per paragraph (the help wraps them)
HELP = "\n\n".join(" ".join(paragraph.split()) for paragraph in __doc__.strip().split("\n\n"))


def tiff_to_n5(
    input: str = typer.Option(..., "-i", "--input", help="Folder of TIFF slices, or one multi-page TIFF file."),
    input_name_pattern: str = typer.Option("*.tif", "--input_name_pattern", "--input-name-pattern", help="Slice file names in the folder: a glob without '/'."),
    output: str = typer.Option(..., "-o", "--output", help="Output container (created if missing; N5 unless named *.zarr)."),
    dataset: str = typer.Option("/s0", "-d", "--data_set", "--dataset", "--output_data_set", "--output-dataset", help="Output dataset path."),
    chunks: str = typer.Option("512,512,512", "-c", "--chunk_size", "--chunk-size", "--chunks", "--block_size", help="Chunk size (N5 blockSize) x,y,z; one number means cubic."),
    subvol: str | None = typer.Option(None, "--subvol", "--partial_volume", "--partial-volume", help="Only this region x0,y0,z0,dx,dy,dz (start and size, clipped to the image) is written; the dataset has the full shape."),
    compression: str = typer.Option("gzip", "--compression", "--n5_compression", help="N5 compression: gzip, raw, bzip2 (bz2), xz (lzma) or blosc."),
    compression_level: int | None = typer.Option(None, "--compression-level", "--compression_level", help="Codec level (default gzip 1, bzip2 9, xz 6, blosc 5; raw takes none)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a target dataset that is not this same conversion."),
    io_threads: int | None = typer.Option(None, "--io-threads", "--io_threads", "--threads", "--workers", min=1, help="Threads reading and encoding chunks (default: CPUs, 2..8; more than 4 per CPU or 64 in all are capped, with a note)."),
    memory_gb: float = typer.Option(1.5, "--memory-gb", "--memory_gb", min=0.0, help="Memory for chunks in flight, GB (one being encoded takes up to 2.5x its raw size); at least one chunk is always in flight."),
    distributed: bool = typer.Option(False, "--distributed", hidden=True, help="Accepted for the host's command line; the conversion runs on this machine."),
    no_progress: bool = typer.Option(False, "--no-progress", "--no_progress", help="No progress bar."),
    version: bool = VersionOption,
) -> None:
    import signal
    import sys

    from exllsm_neuronseg.codecs import compressor, describe
    from exllsm_neuronseg.errors import OutputExistsError
    from exllsm_neuronseg.geometry import format_xyz, parse_xyz
    from exllsm_neuronseg.tiff import tiff_to_n5 as convert

    # Nextflow stops tasks with SIGTERM: exit through Python so the temporary dataset is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    codec = compressor(compression, compression_level)
    chunk_shape = parse_xyz(chunks, "chunk size", minimum=1)
    progress = Progress("chunk", enabled=not no_progress)
    try:
        result = convert(
            input,
            output,
            dataset,
            chunk_shape,
            pattern=input_name_pattern,
            subvol=subvol,
            compression=compression,
            compression_level=compression_level,
            overwrite=overwrite,
            threads=io_threads,
            memory_limit=int(memory_gb * 1e9),
            progress=progress,
        )
    except OutputExistsError as exc:
        fail(f"{exc} ({overwrite_hint()})")
    finally:
        progress.close()
    vol = result.volume
    if result.skipped:
        typer.echo(f"dataset {vol}: already converted from these {result.files} TIFF files; nothing written")
        return
    region = "" if result.region == vol.box else f", region {result.region}"
    typer.echo(
        f"dataset {vol}: shape {format_xyz(vol.shape)}, chunks {format_xyz(vol.chunks)}, {vol.dtype}, {describe(codec)}"
        f"{region}: {result.chunks_written} chunks from {result.files} TIFF files in {result.seconds:.1f} s "
        f"({result.mb_per_s:.1f} MB/s)"
    )


app = app_for(tiff_to_n5, HELP)

if __name__ == "__main__":
    run(app)
