#!/usr/bin/env bash
# Create the MONAI Label environment (.venv-monailabel at the repository root): monailabel 0.8.5
# with this bundle installed without its own pins (they want pydicom 3, monailabel wants < 3).
#   bash monailabel/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-monailabel}
start=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c monailabel/constraints.txt monailabel==0.8.5 torch torchvision monai \
    lpips==0.1.4 fire einops nibabel scikit-image pytorch-ignite
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
echo "MONAI Label environment ready in $VENV: $(( $(date +%s) - start )) s"
