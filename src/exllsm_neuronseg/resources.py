"""How many CPUs this process may use: the one answer for TensorFlow's thread pools and the
default number of chunk I/O threads.

``os.cpu_count()`` counts the machine's cores, but a job scheduler or a container usually gives a
process fewer: a CPU affinity mask (LSF and SLURM cpusets, ``taskset``) or a CPU quota (``docker
run --cpus``, Kubernetes limits, systemd: cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``).  A
TensorFlow that starts one thread per core of a 64-core node inside a 4-CPU job only queues them
on those 4 CPUs, and under a quota it is throttled for whole scheduling periods.  The smallest of
the three is the answer; the pipeline passes its ``task.cpus`` explicitly (:func:`set_cpus`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import ParameterError

_CHOSEN: int | None = None  # set_cpus: the process's explicit choice


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all the machine's where the OS has no such mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The cgroup folders (own first, then its ancestors) that may hold a CPU limit for this process."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    dirs: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        names = controllers.split(",")
        if controllers == "":  # cgroup v2: one unified hierarchy
            bases = [root]
        elif "cpu" in names:  # cgroup v1: the cpu controller's mount, alone or joined with cpuacct
            bases = list(dict.fromkeys([root / controllers, root / "cpu", root / "cpu,cpuacct"]))  # each once
        else:
            continue
        rel = Path(path.lstrip("/"))
        if ".." in rel.parts:  # outside this cgroup namespace: its folders are not ours to read
            continue
        for base in bases:
            here = base / rel
            while True:
                dirs.append(here)
                if here == base:
                    break
                here = here.parent
    return dirs


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors, in CPUs (1.5 = one and a
    half CPUs' time per period), or None when there is none (or no cgroup file system)."""
    limits = []
    for folder in _cgroup_dirs(Path(root), Path(proc_cgroup)):
        try:
            v2 = (folder / "cpu.max").read_text().split()
        except OSError:
            v2 = None
        if v2 and v2[0] != "max":
            try:
                quota, period = float(v2[0]), float(v2[1]) if len(v2) > 1 else 100000.0
            except ValueError:
                continue
            if quota > 0 and period > 0:
                limits.append(quota / period)
            continue
        try:
            quota = float((folder / "cpu.cfs_quota_us").read_text())
            period = float((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:  # -1: no quota
            limits.append(quota / period)
    return min(limits) if limits else None


def available_cpus(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (rounded up)."""
    cpus = affinity_cpus()
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit - 1e-9)))
    return cpus


def set_cpus(count: int | None) -> None:
    """Use ``count`` CPUs in this process (None: :func:`available_cpus`).  Takes effect for
    TensorFlow only if it is set before TensorFlow starts (:func:`.inference.import_tensorflow`)."""
    global _CHOSEN
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ParameterError(f"CPU count {count!r} must be an integer >= 1")
    _CHOSEN = count


def cpus() -> int:
    """The CPUs this process uses: the count given to :func:`set_cpus`, else :func:`available_cpus`."""
    return _CHOSEN if _CHOSEN is not None else available_cpus()
