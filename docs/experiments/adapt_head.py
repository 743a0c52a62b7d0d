"""Test-time adaptation of the flow-correction head (``--adapt N`` on weights with a head), scored
leave-one-out on cine studies at several step counts in one run.

As `calid evaluate --adapt` does, the slices between even neighbours are predicted by a copy
adapted on the even slices alone (their own triplets, neighbours four acquisitions apart), the
odd ones likewise, so no scored slice is ever seen; here the same adaptation is scored after
each of ``--checkpoints`` steps (0: the weights as shipped) instead of once. Gains are over the
flow midpoint in the heart region (`calid evaluate`'s 80 mm square), CaLID at the model's
steps from the mean start, at every gap (no fallback); with every phase scored, also fused
over phases (the default window) against plain flow. Writes one JSON line per study, learning
rate and checkpoint, with the heart scores of flow and linear interpolation from the same run.

    OMP_NUM_THREADS=1 python docs/experiments/adapt_head.py OUT.jsonl STUDY [STUDY ...] --lr 1e-4 \
        --checkpoints "[0, 20, 60]" --phases 10
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path

import numpy as np
import torch

from bundle.adapt import ADAPT_HEAD_LR, adapting_head
from bundle.data import evenly_spread
from bundle.evaluate import heart_box, scores
from bundle.inference import LearnedMidpoints
from bundle.io import read_sax
from bundle.motion import FlowMidpoints
from bundle.stack import crop_inplane, every_nth_slice
from bundle.studies import dicom_folder, lv_centre_from_contours
from bundle.temporal import PhaseFusion
from bundle.transforms import IntensityScaler
from bundle.upsample import linear_midpoints
from bundle.weights import load_model

ROOT = Path(__file__).resolve().parents[2]


def adapted_predictions(model, stack, slices, checkpoints, lr, seed=0):
    """{step: leave-one-out CaLID predictions (inner slices, scored phases, X, Y)} from ``slices``
    (the scored phases of ``stack``, (Z, phases, X, Y)), by copies adapted per parity (on every
    phase of the neighbours' parity) for each step in ``checkpoints``."""
    left, right, gap = slices[:-2], slices[2:], 2 * stack.slice_spacing
    out = {step: torch.empty_like(left) for step in checkpoints}
    pre = model.preprocessor(stack)
    for parity in (0, 1):  # row i: neighbours i and i + 2, the copy adapted on slices of parity i % 2
        rows = torch.arange(parity, len(left), 2)
        start = time.perf_counter()
        for step, adapted in adapting_head(model, every_nth_slice(stack, parity, 2), lr=lr, seed=seed):
            if step in checkpoints:
                predictor = LearnedMidpoints(adapted, pre, num_steps=model.info.steps, chunk_size=8, fallback=False)
                out[step][rows] = predictor(left[rows], right[rows], gap).to(left.dtype)
                print(f"parity {parity}, step {step}: {time.perf_counter() - start:.0f} s", flush=True)
            if step == max(checkpoints):
                break
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a .jsonl file (appended to)")
    parser.add_argument("studies", nargs="+", type=Path)
    parser.add_argument("--weights", type=Path, default=ROOT / "models")
    parser.add_argument("--lr", type=float, default=ADAPT_HEAD_LR)
    parser.add_argument("--checkpoints", default="[0, 20, 60]")
    parser.add_argument("--phases", type=int, help="score this many phases, evenly spread (adapting uses all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    checkpoints = sorted(set(ast.literal_eval(args.checkpoints)))
    model = load_model(args.weights)
    for study in args.studies:
        stack = read_sax(dicom_folder(study))
        phases = stack.shape[3]
        scored = evenly_spread(phases, args.phases) if args.phases else list(range(phases))
        box = heart_box(stack, lv_centre_from_contours(study))
        scaler = IntensityScaler.fit(stack.array)
        truth = scaler(stack.array[:, :, 1:-1][..., scored].transpose(2, 3, 0, 1).reshape(-1, *stack.shape[:2]))
        sub = crop_inplane(stack, 0, stack.shape[0], 0, stack.shape[1], phases=scored)
        slices = torch.from_numpy(sub.array.transpose(2, 3, 0, 1).astype(np.float64))
        gap = 2 * stack.slice_spacing
        flow = FlowMidpoints()(slices[:-2], slices[2:], gap)
        fusion = PhaseFusion(None) if len(scored) == phases else None  # fuses only a whole cine

        def score(pred):
            return scores(scaler(pred.flatten(0, 1).numpy()), truth, box)

        base, linear = score(flow), score(linear_midpoints(slices[:-2], slices[2:], gap))
        heart = ("psnr_heart", "ssim_heart")
        baselines = {f"{name}_{k}": v[k] for name, v in (("flow", base), ("linear", linear)) for k in heart}
        predictions = adapted_predictions(model, stack, slices, checkpoints, args.lr, args.seed)
        for step, pred in predictions.items():
            s = score(pred)
            row = {"study": Path(study).name, "lr": args.lr, "step": step, "phases": len(scored)}
            row.update({k: s[k] for k in heart}, **baselines)  # the baselines of the same run
            row.update(psnr_gain=s["psnr_heart"] - base["psnr_heart"], ssim_gain=s["ssim_heart"] - base["ssim_heart"])
            if fusion is not None:
                fused = score(fusion.fuse(pred, gap))
                row.update(fused_psnr_gain=fused["psnr_heart"] - base["psnr_heart"])
                row.update(fused_ssim_gain=fused["ssim_heart"] - base["ssim_heart"])
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
