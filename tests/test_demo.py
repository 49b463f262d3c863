"""The README's first command (issue 14): bin/demo.sh on a fresh machine reaches a picture of a
segmented synthetic volume. Here it runs the stage-by-stage path (EXLLSM_DEMO_ENGINE=stages: no
Nextflow on this machine) with the model found through EXLLSM_MODEL, into a temporary folder."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_reaches_pictures_and_neurons(model_path, tmp_path):
    env = {**os.environ, "EXLLSM_MODEL": str(model_path), "EXLLSM_DEMO_ENGINE": "stages"}
    proc = subprocess.run(
        ["bash", str(ROOT / "bin" / "demo.sh"), str(tmp_path / "demo")], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "demo"
    for picture in ("segmented.png", "connected.png"):
        assert (work / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    with open(work / "objects.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 5 and all(int(r["voxels"]) >= 200 for r in rows)  # the synthetic neurites, as objects
    assert f"pictures       {work}/segmented.png, {work}/connected.png" in proc.stderr
