"""TensorFlow's oneDNN kernels are on for every x86 CPU, not only those TensorFlow picks itself.

Without them TensorFlow runs 3D convolutions through Eigen on CPUs lacking AVX512_VNNI/BF16/AMX
(AMD EPYC, older Xeons): 3.4x slower end to end on an AMD EPYC.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

_PROBE = (
    "import exllsm_neuronseg.inference as i; i.import_tensorflow(); "
    "from tensorflow.python.util import _pywrap_util_port as p; print(p.IsMklEnabled())"
)

x86 = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN default is set on x86 only"
)


def _probe(value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = value
    run = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()[-1]


@x86
def test_onednn_on_by_default():
    assert _probe(None) == "True"


@x86
def test_users_choice_is_kept():
    assert _probe("0") == "False"


def test_importing_the_package_sets_only_a_default(monkeypatch):
    import importlib

    import exllsm_neuronseg

    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    importlib.reload(exllsm_neuronseg)
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    importlib.reload(exllsm_neuronseg)
    expected = "1" if platform.machine().lower() in ("x86_64", "amd64") else None
    assert os.environ.get("TF_ENABLE_ONEDNN_OPTS") == expected
