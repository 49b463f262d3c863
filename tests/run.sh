#!/usr/bin/env bash
# The project's one test command: creates .venv at the project root (if missing), installs the
# project with its CPU TensorFlow and test extras into it, then runs the whole test suite.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[tf,test]"
export PATH="$root/bin:$root/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
