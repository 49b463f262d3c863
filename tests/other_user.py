"""Child processes that run as another user, so that permission bits apply (root ignores them).

As root the child drops to ``nobody``: files the test wrote are then another user's, exactly like
output left by a container run as root. As any other user the test makes its files read-only
instead, and the child runs as the same user.
"""

from __future__ import annotations

import os
import shutil
import site
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

NOBODY = 65534
IS_ROOT = os.geteuid() == 0
SRC = Path(__file__).resolve().parents[1] / "src"


def _others_can_run(path: Path) -> bool:
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def _interpreter() -> tuple[str, dict]:
    """A Python of this version the other user can start, and the environment that finds the
    project and its dependencies (this one's may live in root's home, which nobody can enter)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if not IS_ROOT or _others_can_run(Path(sys.executable)):
        return sys.executable, env
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (shutil.which(version), f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if candidate and Path(candidate).exists() and _others_can_run(Path(candidate)):
            env["PYTHONPATH"] = os.pathsep.join([str(SRC), *site.getsitepackages()])
            return candidate, env
    pytest.skip(f"no {version} that user {NOBODY} can run (this one is {sys.executable})")


def _become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@contextmanager
def shared_tmp() -> Iterator[Path]:
    """A temporary folder the other user can enter (pytest's tmp_path is private to this user)."""
    path = Path(tempfile.mkdtemp(prefix="exllsm-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(path)


def protect(path: Path) -> None:
    """Make ``path`` (and what is below it) unwritable for the child: as root nothing is needed."""
    if IS_ROOT:
        return
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)


def run_as_other_user(args: list, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python *args`` as the other user (text mode, output captured)."""
    python, env = _interpreter()
    return subprocess.run(
        [python, "-s", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        preexec_fn=_become_nobody if IS_ROOT else None,
    )
