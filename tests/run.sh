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
# MONAI Label lives in an environment of its own (numpy<2, pydicom<3); its integration test
# skips, saying so, without it. CALID_SKIP_MONAILABEL=1 skips creating it.
if [ "${CALID_SKIP_MONAILABEL:-0}" != "1" ] && [ ! -x .venv-monailabel/bin/python ]; then
    bash monailabel/setup_env.sh
fi
.venv/bin/python -m flake8 bundle tests docs monailabel
.venv/bin/python -m black --check --quiet bundle tests docs monailabel
.venv/bin/python -m isort --check-only --quiet bundle tests docs monailabel
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
