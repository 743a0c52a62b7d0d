#!/usr/bin/env bash
# Start the MONAI Label server for this bundle on 127.0.0.1 (creating its environment first if
# needed). Offline: the app downloads nothing, and the server starts without trainers.
#   bash monailabel/start_server.sh [STUDIES_DIR] [PORT]
# STUDIES_DIR holds NIfTI stacks (default: the bundle's docs/example); the infer task is
# calid_upsample (params: factor, method, steps, refine, seed, precision, chunk_size).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-monailabel}
STUDIES=${1:-docs/example}
PORT=${2:-8000}
[ -x "$VENV/bin/python" ] || bash monailabel/setup_env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$VENV/bin/python" -m monailabel.main start_server --app monailabel/apps/calid --studies "$STUDIES" \
    --host 127.0.0.1 --port "$PORT" --conf skip_trainers true --conf skip_strategies false ${CALID_MONAILABEL_ARGS:-}
