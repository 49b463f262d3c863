"""Shared fixtures: the published model, synthetic N5 volumes and a runner for the bin/ scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin"
MODEL = ROOT.parent / "shared" / "models" / "neuron_2021.h5"
SCALING = 0.00045  # factor of the synthetic volumes (background ~30 counts -> ~0.014)


@pytest.fixture(scope="session")
def model_path() -> Path:
    if not MODEL.is_file():
        pytest.fail(f"the published model is required at {MODEL} (see ../shared/models/README.md)")
    return MODEL


@pytest.fixture(scope="session")
def synthetic_n5(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 150x140x130 synthetic N5 volume (dataset c1/s0, chunks 32^3) and its image in x,y,z."""
    from exllsm_neuronseg.synthetic import SyntheticSpec, write_synthetic_n5

    path = tmp_path_factory.mktemp("vol") / "input.n5"
    spec = SyntheticSpec(shape=(150, 140, 130), n_tubes=5, n_puncta=20, seed=3)
    image = write_synthetic_n5(str(path), "c1/s0", spec, chunks=(32, 32, 32))
    return path, image


def run_script(name: str, *args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``bin/<name>`` with this interpreter; returns the completed process (text mode)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(BIN / name), *map(str, args)], capture_output=True, text=True, env=full_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """What the image tests measured (build times, image sizes), at the end of the run."""
    report = getattr(config, "_exllsm_image_report", None)
    if not report:
        return
    terminalreporter.section("stage images")
    for key, value in report.items():
        terminalreporter.write_line(f"{key}: {value}")
