#!/usr/bin/env bash
# The project's one test command: creates .venv at the project root (if missing), installs the
# project with every stage's extras, CPU TensorFlow and the test extras into it, then runs the whole
# test suite. As root on Debian it first installs the container tools the image tests need (podman,
# debootstrap, ...; quietly, log in .tools/logs/), and tests/containers/test_images.py then builds
# and runs the stage images.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[all,tf,test]"
bash tests/containers/install_tools.sh "$root/.tools/logs/container-tools.log"
export PATH="$root/bin:$root/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
