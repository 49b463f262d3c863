"""Runs inside a stage image (mounted read-only by test_images.py) with the image's own Python.

Usage: python3 probe.py SCRIPT...   Prints one JSON object: each script's --help and --version,
`pip check`, `pip list`, the user it ran as, and whether matplotlib (where the image sets
MPLCONFIGDIR) uses its baked font cache without rebuilding or writing it.
"""

import json
import os
import subprocess
import sys


def run(*command: str) -> dict:
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
    return {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr}


def listing(folder: str) -> dict:
    found = {}
    for name in sorted(os.listdir(folder)):
        st = os.stat(os.path.join(folder, name))
        found[name] = [st.st_size, st.st_mtime_ns]
    return found


result = {
    "uid": os.getuid(),
    "gid": os.getgid(),
    "scripts": {name: {"help": run(name, "--help"), "version": run(name, "--version")} for name in sys.argv[1:]},
    "pip_check": run(sys.executable, "-m", "pip", "check"),
    "pip_list": json.loads(run(sys.executable, "-m", "pip", "list", "--format", "json")["out"] or "[]"),
}
mpl = os.environ.get("MPLCONFIGDIR")
if mpl:
    before = listing(mpl) if os.path.isdir(mpl) else None
    plot = run(
        sys.executable,
        "-c",
        "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; "
        "plt.plot([0, 1]); print(matplotlib.get_cachedir())",
    )
    result["matplotlib"] = {
        "dir": mpl,
        "before": before,
        "after": listing(mpl) if os.path.isdir(mpl) else None,
        "writable": os.access(mpl, os.W_OK),
        "run": plot,
    }
print(json.dumps(result))
