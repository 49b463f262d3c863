"""The CPUs this process may use (resources.py): affinity and cgroup quota, TensorFlow's thread
pools and the I/O threads sized to them, and segment_volume.py --cpus."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SCALING, run_script
from exllsm_neuronseg import resources, volume
from exllsm_neuronseg.errors import ParameterError


def cgroup_tree(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc_cgroup").write_text(proc)
    return root, tmp_path / "proc_cgroup"


@pytest.mark.parametrize(
    "proc, files, limit",
    [
        ("0::/job/task\n", {"job/task/cpu.max": "150000 100000\n", "job/cpu.max": "max 100000\n"}, 1.5),
        ("0::/job/task\n", {"job/task/cpu.max": "max 100000\n", "job/cpu.max": "50000 100000\n"}, 0.5),  # an ancestor's
        ("0::/\n", {"cpu.max": "400000 100000\n"}, 4.0),  # inside a container: its own cgroup is the root
        ("0::/job\n", {"job/cpu.max": "max 100000\n"}, None),
        ("4:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc\n",
         {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 3.0),
        ("4:cpu:/x\n", {"cpu/x/cpu.cfs_quota_us": "-1\n", "cpu/x/cpu.cfs_period_us": "100000\n"}, None),  # v1, no quota
        ("0::/job\n", {}, None),  # no cgroup files at all
        # cgroup v1 inside a container: the host's path in /proc, the container's own limit at the mount root
        ("4:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 2.0),
        ("4:cpuacct,cpu:/x\n", {"cpu/x/cpu.cfs_quota_us": "150000\n", "cpu/x/cpu.cfs_period_us": "100000\n"}, 1.5),
        ("0::/../sibling\n", {"cpu.max": "100000 100000"}, None),  # outside the cgroup namespace: not ours
        ("garbage\n", {"cpu.max": "100000 100000"}, None),
    ],
)
def test_cgroup_cpu_limit(tmp_path, proc, files, limit):
    root, proc_file = cgroup_tree(tmp_path, proc, files)
    assert resources.cgroup_cpu_limit(root, proc_file) == limit


def test_available_cpus_is_the_smallest_of_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    root, proc = cgroup_tree(tmp_path, "0::/j\n", {"j/cpu.max": "250000 100000\n"})
    assert resources.available_cpus(root, proc) == 3  # 2.5 CPUs of time: 3 threads keep it busy
    root, proc = cgroup_tree(tmp_path / "b", "0::/j\n", {"j/cpu.max": "20000 100000\n"})
    assert resources.available_cpus(root, proc) == 1
    root, proc = cgroup_tree(tmp_path / "c", "0::/j\n", {})
    assert resources.available_cpus(root, proc) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    root, proc = cgroup_tree(tmp_path / "d", "0::/j\n", {"j/cpu.max": "800000 100000\n"})
    assert resources.available_cpus(root, proc) == 1


def test_set_cpus_drives_the_io_threads(monkeypatch):
    monkeypatch.setattr(resources, "_CHOSEN", None)
    resources.set_cpus(1)
    assert resources.cpus() == 1 and volume.default_io_threads() == 2 and volume.max_io_threads() == 4
    resources.set_cpus(6)
    assert volume.default_io_threads() == 6 and volume.max_io_threads() == 24
    resources.set_cpus(None)
    assert resources.cpus() == resources.available_cpus()
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ParameterError, match="CPU count .* must be an integer >= 1"):
            resources.set_cpus(bad)


_PROBE = """
import os, sys
from exllsm_neuronseg import inference, resources
if sys.argv[1] == "affinity":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
elif sys.argv[1] != "default":
    resources.set_cpus(int(sys.argv[1]))
tf = inference.import_tensorflow()
print(resources.cpus(), tf.config.threading.get_intra_op_parallelism_threads(),
      tf.config.threading.get_inter_op_parallelism_threads())
"""


def _threads(arg: str) -> list[int]:
    run = subprocess.run([sys.executable, "-c", _PROBE, arg], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return [int(v) for v in run.stdout.split()]


def test_tensorflow_threads_follow_the_cpus():
    n = resources.available_cpus()
    assert _threads("default") == [n, n, n]
    assert _threads("3") == [3, 3, 3]
    assert _threads("affinity") == [1, 1, 1]  # a scheduler's cpuset of one CPU


def test_segment_volume_cpus(synthetic_n5, model_path, tmp_path):
    from exllsm_neuronseg.volume import create_volume

    inp, _ = synthetic_n5
    out = tmp_path / "out.n5"
    create_volume(out, "seg/s0", (150, 140, 130), (32, 32, 32), "float32")
    proc = run_script(
        "segment_volume.py", "-i", inp, "-id", "/c1/s0", "-o", out, "-od", "seg/s0", "-m", model_path, "-s", SCALING,
        "--start", "0,0,0", "--end", "64,64,64", "--model_input_shape", "132,132,132", "--cpus", "1", "--redo",
        "--no-progress", check=True,
    )
    assert "Mvox/s" in proc.stdout
    assert "--cpus" in run_script("segment_volume.py", "--help").stdout
    bad = run_script("segment_volume.py", "-i", "x", "-o", "y", "-m", "z", "--cpus", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: Invalid value for '--cpus': Input should be greater than or equal to 1"
    ), bad.stderr
