#!/usr/bin/env bash
# One prepared GPU session: the CUDA figures of the benchmarks, the CUDA inference tests and a
# short real training run (both stages, `cpu` preset, 128 x 128 crops of the Sunnybrook
# training patients made by docs/example/make_example.py ... 64 1, validated on SCD0000401).
#
#   DATA=folder_of_crops OUT=results_folder bash docs/gpu/run_checks.sh
#
# Every step is time-boxed and packs its results into $OUT/results.tar.gz as it goes, so a
# step that runs long costs only itself. SMOKE=1 shrinks every step (to try it on a CPU).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
DATA=${DATA:-.gpu_data/sunnybrook_crop128}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
RESULTS=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
if [ -d .whl ]; then  # wheels carried to a machine without the registries
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
pack() { tar -czf "$OUT/results.tar.gz" -C "$RESULTS" . ; }
step() {  # step NAME SECONDS COMMAND...: run, time-boxed, output to NAME.log
    local name=$1 limit=$2; shift 2
    local start=$(date +%s)
    timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    echo "$name: exit $? after $(( $(date +%s) - start )) s" | tee -a "$RESULTS/steps.txt"
    pack
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"
} > "$RESULTS/machine.txt" 2>&1

if [ "$SMOKE" = 1 ]; then
    BENCH=(--preset tiny --slices 3 --phases 2 --size 64 --steps 2)
    SPEED=(--preset tiny --iterations 1)
    TRAIN=(--preset tiny --max_epochs 1)
    ROOT_LIMIT=120
else
    BENCH=(--preset cpu)
    SPEED=(--preset paper --iterations 5)
    TRAIN=(--preset cpu --max_epochs 6)
    ROOT_LIMIT=130
fi

step benchmark_inference 150 python3 -m bundle.cli benchmark "${BENCH[@]}" --device "$DEVICE"
step train_speed 60 python3 -m bundle.cli train-speed "${SPEED[@]}" --device "$DEVICE"
step pytest_cuda 80 python3 -m pytest -q -p no:cacheprovider tests/test_inference.py tests/test_sampling.py

COMMON=(--meta_file configs/metadata.json --bundle_root . --dataset_dir "$DATA" --val_studies "['SCD0000401']"
        --gaps "[1,2]" --device "\$torch.device('$DEVICE')" "${TRAIN[@]}")
step train_autoencoder "$ROOT_LIMIT" python3 -m monai.bundle run training \
    --config_file "['configs/train_autoencoder.json']" --output_dir "$RESULTS/autoencoder" "${COMMON[@]}"
step train_diffusion "$ROOT_LIMIT" python3 -m monai.bundle run training \
    --config_file "['configs/train_autoencoder.json','configs/train_diffusion.json']" \
    --autoencoder_dir "$RESULTS/autoencoder" --output_dir "$RESULTS/diffusion" "${COMMON[@]}"
# keep logs and final weights, not the resumable checkpoints or TensorBoard files
rm -rf "$RESULTS"/*/checkpoints "$RESULTS"/*/tensorboard
pack
cat "$RESULTS/steps.txt"
