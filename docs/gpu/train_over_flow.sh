#!/usr/bin/env bash
# CaLID over flow on one lent GPU, in one call of at most 8 minutes: train (time-boxed, the
# weights that validate best against flow on the held-out ED/ES patients are kept), export,
# then evaluate beside linear and flow on SCD0000401 (leave-one-out), the held-out ED/ES
# patients and 3 phantom subjects (x4 per level). Writes $OUT/model (model.pt fp16 +
# model.json), $OUT/eval (report.md, report.json) and $OUT/logs.tar.gz.
#
#   CINE=../shared/data/sunnybrook-scd LABELLED=../shared/data/sunnybrook-scd-edes OUT=out/over_flow \
#   TRAIN_SECONDS=330 EPOCHS=60 BATCH=32 bash docs/gpu/train_over_flow.sh
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/over_flow}
CINE=${CINE:-../shared/data/sunnybrook-scd}
LABELLED=${LABELLED:-../shared/data/sunnybrook-scd-edes}
PRESET=${PRESET:-cpu}
EPOCHS=${EPOCHS:-60}
BATCH=${BATCH:-32}
TRAIN_SECONDS=${TRAIN_SECONDS:-330}
IMAGE_LOSS=${IMAGE_LOSS:-10}
DEVICE=${DEVICE:-cuda}
RUN="$OUT/run"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
mkdir -p "$OUT"
timeout "$TRAIN_SECONDS" python3 -m monai.bundle run training \
    --config_file "['configs/train_autoencoder.json','configs/train_diffusion.json','configs/train_diffusion_flow.json']" \
    --meta_file configs/metadata.json --bundle_root . --preset "$PRESET" --device "\$torch.device('$DEVICE')" \
    --cine_dir "$CINE" --labelled_dir "$LABELLED" --output_dir "$RUN" --max_epochs "$EPOCHS" \
    --batch_size "$BATCH" --image_loss_weight "$IMAGE_LOSS" > "$OUT/train.log" 2>&1
echo "training: exit $? (124: the time box ended it; the best weights so far are kept)"
python3 -c "import sys; from bundle.weights import export_run; export_run(*sys.argv[1:])" "$RUN" "$OUT/model"
mkdir -p "$OUT/edes_val"
for patient in $(python3 -c "from bundle.flow_triplets import HELD_OUT_PATIENTS; print(*HELD_OUT_PATIENTS)"); do
    ln -sf "$(realpath "$LABELLED")/$patient"_* "$OUT/edes_val/"
done
python3 -m bundle.cli phantom "$OUT/phantom" --subjects 3 --seed 1000 --size 128 --slices 11 --phases 10
python3 -m bundle.cli evaluate "$OUT/eval" --studies "['$CINE/SCD0000401']" --weights "$OUT/model" \
    --labelled-stacks "$OUT/edes_val" --phantom "$OUT/phantom" --device "$DEVICE" --steps 1 \
    --sweep-steps "[1,8]" --noperceptual --noreference > "$OUT/evaluate.log" 2>&1
echo "evaluation: exit $?"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" train.log evaluate.log run/validation.csv run/train_log.csv 2>/dev/null
rm -rf "$RUN/checkpoints" "$OUT/phantom"
ls -R "$OUT" | head -40
