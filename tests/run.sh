#!/usr/bin/env bash
# Set up (once) and run the tests: `bash tests/run.sh` from the repository root.
# Creates .venv with the pinned dependencies and the test extra, checks style, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "setup: $(( $(date +%s) - start )) s"
.venv/bin/python -m flake8 bundle tests docs
.venv/bin/python -m black --check --quiet bundle tests docs
.venv/bin/python -m isort --check-only --quiet bundle tests docs
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
