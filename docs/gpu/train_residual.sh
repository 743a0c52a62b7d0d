#!/usr/bin/env bash
# Train both stages on one GPU within a time box and keep the weights that validate best:
# the VAE, then the correction-to-linear ("residual") latent diffusion model, on the 128 x 128
# crops around the LV of the Sunnybrook training patients (docs/example/make_example.py STUDY
# OUT 64 1), validating on SCD0000401. Writes fp16 state dicts (under 16 MB each) and
# logs.tar.gz (logs, train_log.csv, validation.csv) to $OUT.
#
#   DATA=folder OUT=results PRESET=cpu AE_EPOCHS=6 LDM_EPOCHS=6 bash docs/gpu/train_residual.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/train}
DATA=${DATA:-.gpu_data/sunnybrook_crop128}
PRESET=${PRESET:-cpu}
DEVICE=${DEVICE:-cuda}
AE_EPOCHS=${AE_EPOCHS:-6}
LDM_EPOCHS=${LDM_EPOCHS:-6}
AE_SECONDS=${AE_SECONDS:-60}
LDM_SECONDS=${LDM_SECONDS:-80}
RUN=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
COMMON=(--meta_file configs/metadata.json --bundle_root . --dataset_dir "$DATA" --val_studies "['SCD0000401']"
        --gaps "[1,2]" --device "\$torch.device('$DEVICE')" --preset "$PRESET")
timeout "$AE_SECONDS" python3 -m monai.bundle run training --config_file "['configs/train_autoencoder.json']" \
    --output_dir "$RUN/autoencoder" --max_epochs "$AE_EPOCHS" "${COMMON[@]}" > "$RUN/autoencoder.log" 2>&1
echo "autoencoder: exit $?"
timeout "$LDM_SECONDS" python3 -m monai.bundle run training \
    --config_file "['configs/train_autoencoder.json','configs/train_diffusion.json']" --prediction residual \
    --val_steps 1 --val_every_epochs 1 --autoencoder_dir "$RUN/autoencoder" --output_dir "$RUN/diffusion" \
    --max_epochs "$LDM_EPOCHS" "${COMMON[@]}" > "$RUN/diffusion.log" 2>&1
echo "diffusion: exit $?"
python3 - "$RUN" "$OUT" <<'PY'
import shutil, sys
from pathlib import Path

import torch

run, out = Path(sys.argv[1]), Path(sys.argv[2])
for src, name in [(run / "autoencoder/autoencoder", "autoencoder"), (run / "diffusion/best", "diffusion")]:
    if src.with_suffix(".pt").exists():
        state = torch.load(src.with_suffix(".pt"), weights_only=True)
        torch.save({k: v.half() for k, v in state.items()}, out / f"{name}.pt")
        shutil.copy(src.with_suffix(".json"), out / f"{name}.json")
# logs and tables in one archive (few files come back from a lent machine)
import tarfile

with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
    for stage in ("autoencoder", "diffusion"):
        for name in (f"{stage}.log", f"{stage}/train_log.csv", f"{stage}/validation.csv"):
            if (run / name).exists():
                tar.add(run / name, arcname=name)
print(sorted(p.name for p in out.rglob("*")))
PY
