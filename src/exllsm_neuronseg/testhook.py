"""Fault injection for tests: stop a process at a named moment, without timing.

The library calls :func:`checkpoint` at the moments a kill or a concurrent change matters (between
the steps of a dataset replacement, before a block's first chunk, after its last one).  It does
nothing unless the environment variable ``EXLLSM_TEST_HOOK`` names that moment::

    EXLLSM_TEST_HOOK="create:old-moved-away=kill"            # SIGKILL this process there
    EXLLSM_TEST_HOOK="block:chunks-written=pause:/tmp/hook"  # wait there until the test says go

``pause:<folder>`` creates ``<folder>/<moment>.reached`` and waits until ``<folder>/<moment>.go``
exists.  Several entries are separated by ``;``.  In-process tests replace :func:`checkpoint`
itself (callers look it up on this module at each call).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "EXLLSM_TEST_HOOK"


def checkpoint(moment: str) -> None:
    """Act as ``EXLLSM_TEST_HOOK`` says at ``moment`` (normally: nothing)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for entry in spec.split(";"):
        name, _, action = entry.strip().partition("=")
        if name != moment:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("pause:"):
            folder = Path(action.removeprefix("pause:"))
            (folder / f"{moment}.reached").touch()
            while not (folder / f"{moment}.go").exists():
                time.sleep(0.005)
