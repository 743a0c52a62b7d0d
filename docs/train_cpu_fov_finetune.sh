#!/usr/bin/env bash
# The last stage of the shipped weights' recipe: fine-tune the residual denoiser of
# docs/train_cpu_finetune.sh (exported as INIT, a model.pt) on whole 256 x 256 Sunnybrook slices
# of SCD0000101/0201/0301 (the full field of view, not 128 x 128 LV crops), validating on
# SCD0000401 (32 gap-1 triplets, whole slices), 4 epochs (1040 iterations, batch 4); 25 minutes
# on two CPU threads here. WARM: the folder with the VAE as autoencoder.pt
# (docs/gpu/train_residual.sh output).
#   WARM=folder INIT=runs/cpu_residual/model/model.pt bash docs/train_cpu_fov_finetune.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WARM=${WARM:?folder with autoencoder.pt (docs/gpu/train_residual.sh output)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
.venv/bin/python -m monai.bundle run training \
    --config_file "['configs/train_autoencoder.json','configs/train_diffusion.json']" \
    --meta_file configs/metadata.json --bundle_root . --dataset_dir ../shared/data/sunnybrook-scd \
    --val_studies "['SCD0000401']" --gaps "[1,2]" --device "\$torch.device('cpu')" --preset cpu \
    --spatial_size "[256,256]" --batch_size 4 --val_max_triplets 32 \
    --prediction residual --val_steps 1 --val_every_epochs 1 --checkpoint_every 25 --warmup_iterations 50 \
    --autoencoder_dir "$WARM" --init_weights "${INIT:?model.pt of docs/train_cpu_finetune.sh}" --output_dir "${OUT:-runs/fov_residual}" --max_epochs 4
