"""Shared plumbing for the bin/ scripts: error reporting, x,y,z options, version, progress.

Kept beside the scripts (not in the library) so the library stays free of CLI code. Python puts
a script's own folder first on sys.path, so ``from _cli import ...`` works wherever bin/ is.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import typer

from exllsm_neuronseg import __version__
from exllsm_neuronseg.errors import NeuronSegError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter


def fail(message: str) -> NoReturn:
    """Print one line to stderr and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def overwrite_hint() -> str:
    """How to replace an existing output, as the caller knows it: the --overwrite flag, or what a
    pipeline calling the script sets in EXLLSM_OVERWRITE_HINT (e.g. its overwrite_output param)."""
    return os.environ.get("EXLLSM_OVERWRITE_HINT") or "--overwrite replaces it"


# The block selection of the per-block scripts (chosen_blocks reads it)
StartOption = typer.Option(
    None, "--start", metavar="X,Y,Z", help="Block start x,y,z (inclusive); repeat with --end for several blocks. Default 0,0,0 (an empty value is an error)."
)
EndOption = typer.Option(None, "--end", metavar="X,Y,Z", help="Block end x,y,z (exclusive), one per --start. Default: the image shape.")
BlocksOption = typer.Option(
    None, "--blocks", metavar="FILE", help="Block plan file from plan_blocks.py (one x0,y0,z0,x1,y1,z1 per line); with --block-index, instead of --start/--end."
)
BlockIndexOption = typer.Option(
    "all", "--block-index", metavar="LIST", help="Which blocks of --blocks to run: 0-based indices and ranges, e.g. 0-3,7 (default all)."
)


def read_plan(path: str) -> list:
    """The blocks (Boxes) of a block plan file (plan_blocks.py -o); one error line when it cannot be
    read, is malformed or lists no blocks."""
    from exllsm_neuronseg.geometry import read_block_plan

    try:
        text = open(path).read()
    except OSError as exc:
        fail(f"cannot read the block plan {path}: {exc.strerror}")
    plan = read_block_plan(text, path)
    if not plan:
        fail(f"the block plan {path} lists no blocks")
    return plan


def chosen_blocks(
    start: list[str] | None,
    end: list[str] | None,
    blocks: str | None,
    block_index: str,
    image_shape: tuple[int, int, int],
) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The (start, end) x,y,z pairs a per-block script runs: repeated --start/--end pairs (default
    the whole image), or --blocks FILE with --block-index LIST (0-based indices and ranges, or all)."""
    from exllsm_neuronseg.geometry import parse_xyz, select_indices

    starts, ends = start or [], end or []
    if blocks is not None:
        if starts or ends:
            fail("give the blocks either as --start/--end pairs or as --blocks FILE, not both")
        plan = read_plan(blocks)
        return [(plan[i].start, plan[i].end) for i in select_indices(block_index, len(plan))]
    if block_index != "all":
        fail("--block-index selects blocks of a --blocks file; give --blocks too")
    if max(len(starts), len(ends)) > 1 and len(starts) != len(ends):
        fail(f"{len(starts)} --start and {len(ends)} --end values: give one --end per --start")
    return [
        (
            parse_xyz(starts[i], "--start") if starts else (0, 0, 0),  # "" is an error, not a default
            parse_xyz(ends[i], "--end") if ends else image_shape,
        )
        for i in range(max(len(starts), len(ends), 1))
    ]


def set_gpu_memory_growth() -> None:
    """--set_gpu_mem_growth: let TensorFlow grow GPU memory as needed instead of taking it all."""
    from exllsm_neuronseg.inference import import_tensorflow

    tf = import_tensorflow()

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"{os.path.basename(sys.argv[0])} (exllsm-neuronseg) {__version__}")
        raise typer.Exit()


VersionOption = typer.Option(
    False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
)


def app_for(command: Callable, help_text: str) -> typer.Typer:
    """A single-command typer app whose command errors become one stderr line and exit 2.

    Help is plain text (``rich_markup_mode=None``): rich's boxed tables cut long flag names
    (``--training-data…``) to fit 80 columns, and write box-drawing characters into logs.
    """
    app = typer.Typer(add_completion=False, help=help_text, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command(help=help_text, context_settings={"help_option_names": ["-h", "--help"]})(command)
    return app


def warn_if_root_in_image() -> None:
    """Inside a stage image (EXLLSM_IMAGE is set there) as root, what the stage writes belongs to
    root on the host, and a later run as the user cannot replace it: say so before writing."""
    if os.environ.get("EXLLSM_IMAGE") and hasattr(os, "geteuid") and os.geteuid() == 0:
        logging.getLogger("exllsm").warning(
            "warning: running as root in the %s image: what this writes will belong to root, and later runs "
            'as another user cannot replace it; run the container with -u "$(id -u):$(id -g)"',
            os.environ["EXLLSM_IMAGE"],
        )


def run(app: typer.Typer) -> None:
    """Run a script's app: a library error, and typer's own parameter errors (a bad or missing value,
    an unknown flag), become one ``error:`` line on stderr and exit status 2."""
    from typer.exceptions import Abort, TyperException

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    warn_if_root_in_image()
    try:
        status = app(standalone_mode=False)
    except NeuronSegError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except TyperException as exc:  # a bad, missing or unknown option (typer's usage errors)
        typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(2)
    except Abort as exc:
        if isinstance(exc.__cause__, EOFError):  # click turns an EOFError (truncated data) into Abort
            typer.echo(f"error: unexpected end of data: {exc.__cause__}", err=True)
            sys.exit(2)
        sys.exit(130)
    except Exception as exc:  # a full or read-only disk, an unreadable file: one line too
        error = os_error_behind(exc)
        if error is None:
            raise
        typer.echo(f"error: {describe_os_error(error)}", err=True)
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)


def os_error_behind(exc: BaseException | None) -> OSError | None:
    """The OSError an exception is, or was explicitly raised from (``raise ... from``: zarr's stores
    wrap a failed mkdir in KeyError); never one merely being handled when another error happened."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and (exc.errno is not None or exc.strerror):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def describe_os_error(error: OSError) -> str:
    """One line for a failed file operation: what failed, where, and what to do."""
    import errno

    where = f" ({os.fsdecode(error.filename)})" if error.filename is not None else ""
    text = f"{error.strerror or error}{where}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{text}: the file system is full; free space there or write the output elsewhere, then run again"
    if error.errno == errno.EROFS:
        return f"{text}: the file system is read-only; write the output somewhere writable"
    return text


class Progress:
    """Tiles (or tiles of blocks) done with a rate, on stderr; a tqdm bar when stderr is a terminal.

    Elsewhere (a redirected log), or without tqdm (the light create-volume image has none), it
    prints a plain line every 30 s and at the end: no carriage returns or escape codes in logs.
    """

    def __init__(self, unit: str, total_voxels: float = 0.0, enabled: bool = True) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = _PlainBar
        if not sys.stderr.isatty():
            tqdm = _PlainBar
        self.bar = None
        self.unit, self.total_voxels, self.enabled = unit, total_voxels, enabled
        self.t0 = time.perf_counter()
        self.tqdm = tqdm
        self.last_print = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = self.tqdm(
                total=total,
                unit=self.unit,
                file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
                dynamic_ncols=True,
            )
        self.bar.update(done - self.bar.n)
        elapsed = time.perf_counter() - self.t0
        if self.total_voxels and elapsed > 0:
            rate = done / total * self.total_voxels / elapsed / 1e6
            self.bar.set_postfix_str(f"{rate:.2f} Mvox/s", refresh=False)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _PlainBar:
    """The part of tqdm's interface Progress uses, as plain lines: "chunk 3/16 (19%) 12.3 s"."""

    def __init__(self, total: int, unit: str, file, mininterval: float = 30.0, **_) -> None:
        self.total, self.unit, self.file, self.interval = total, unit, file, mininterval
        self.n, self.postfix, self.t0, self.shown = 0, "", time.perf_counter(), -float("inf")

    def update(self, n: int) -> None:
        self.n += n
        now = time.perf_counter() - self.t0
        if self.n >= self.total or now - self.shown >= self.interval:
            self.shown = now
            rate = f", {self.postfix}" if self.postfix else ""
            print(f"{self.unit} {self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%) {now:.1f} s{rate}", file=self.file, flush=True)

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def close(self) -> None:
        pass
