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
    """A single-command typer app whose command errors become one stderr line and exit 2."""
    app = typer.Typer(add_completion=False, help=help_text, pretty_exceptions_enable=False)
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

    Without tqdm (the light create-volume image has none) it prints a plain line every 30 s and at the end.
    """

    def __init__(self, unit: str, total_voxels: float = 0.0, enabled: bool = True) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
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
