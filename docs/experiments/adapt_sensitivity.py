"""How fast test-time adaptation (``--adapt``) moves the learned model on one phantom subject:
the level-1 gain over flow of x4 (8 mm gaps, heart region) before adapting and after 1 and 10
steps, and how far any weight moved. The model is used at every gap (no fallback).

    OMP_NUM_THREADS=2 python docs/experiments/adapt_sensitivity.py WEIGHTS PHANTOM_DIR [SUBJECT]
"""

import sys
from pathlib import Path

from bundle.adapt import adapt_model
from bundle.evaluate import phantom_per_level
from bundle.inference import LearnedMidpoints
from bundle.io import read_sax
from bundle.motion import FlowMidpoints
from bundle.weights import load_model


def main(weights, phantom_dir, subject="phantom_000"):
    folder = Path(phantom_dir)
    sparse = read_sax(folder / f"{subject}.nii.gz")
    truth, labels = read_sax(folder / f"{subject}_truth.nii.gz"), read_sax(folder / f"{subject}_labels.nii.gz")
    model = load_model(weights)
    pre = model.preprocessor(sparse)
    predictors = {"flow": FlowMidpoints(), "calid": LearnedMidpoints(model, pre, num_steps=1, fallback=False)}
    for steps in (1, 10):
        adapted = adapt_model(model, sparse, steps, progress=False)
        moved = max(
            (a - b).abs().max().item() for a, b in zip(adapted.network.parameters(), model.network.parameters())
        )
        print(f"{steps} steps: the largest weight change is {moved:.2g}")
        predictors[f"calid adapted {steps} steps"] = LearnedMidpoints(adapted, pre, num_steps=1, fallback=False)
    result = phantom_per_level(sparse, truth, labels, predictors)
    for name, levels in result.items():
        gain = levels["level 1"]["psnr_heart"] - result["flow"]["level 1"]["psnr_heart"]
        print(f"{name}: level 1 gain over flow {gain:+.2f} dB")


if __name__ == "__main__":
    main(*sys.argv[1:])
