#!/usr/bin/env bash
# The CPU stage of the shipped weights' recipe: fine-tune the correction-to-linear ("residual")
# latent diffusion model on the 128 x 128 LV crops of the Sunnybrook training patients
# (SCD0000101, 0201, 0301), validating on SCD0000401 every epoch (1 DDIM step), keeping the
# weights of the best validation gain (best.pt) and exporting OUT/model/. Warm start: the VAE and
# the diffusion weights of docs/gpu/train_residual.sh (an H200 run). Resumes after a kill.
#
#   WARM=folder_with_autoencoder.pt_and_diffusion.pt DATA=crops OUT=runs/cpu_residual bash docs/train_cpu_finetune.sh
# Crops: python docs/example/make_example.py ../shared/data/sunnybrook-scd/SCDxxx DATA/SCDxxx.nii.gz 64 1
set -euo pipefail
cd "$(dirname "$0")/.."
WARM=${WARM:?folder with autoencoder.pt and diffusion.pt (docs/gpu/train_residual.sh output)}
DATA=${DATA:-.gpu_data/sunnybrook_crop128}
OUT=${OUT:-runs/cpu_residual}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
.venv/bin/python -m monai.bundle run training \
    --config_file "['configs/train_autoencoder.json','configs/train_diffusion.json']" \
    --meta_file configs/metadata.json --bundle_root . --dataset_dir "$DATA" \
    --val_studies "['SCD0000401']" --gaps "[1,2]" --device "\$torch.device('cpu')" --preset cpu \
    --prediction residual --val_steps 1 --val_every_epochs 1 --checkpoint_every 25 \
    --autoencoder_dir "$WARM" --init_weights "$WARM/diffusion.pt" --output_dir "$OUT" --max_epochs "${EPOCHS:-60}"
