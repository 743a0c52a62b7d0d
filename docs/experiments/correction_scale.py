"""How much of CaLID's correction to keep: flow + s * (CaLID - flow) for a few scales s,
leave-one-out as `calid evaluate` scores it (heart region, gain over flow). Scale 1 is CaLID,
0 the flow midpoint; a best scale below 1 would say the correction is right in direction but
too large on unseen hearts. Labelled stacks (the ED/ES patients, per-slice normalised) choose;
real DICOM studies are also scored fused over phases (as the product fuses at their 16 mm).

    OMP_NUM_THREADS=2 python docs/experiments/correction_scale.py eval/edes_val \
        ../shared/data/sunnybrook-scd/SCD0000401 --weights models --scales "[0.5, 0.75, 1, 1.25, 1.5]"

Prints one JSON line per data set and scale, and linear interpolation's gain over flow from the
same run (scale "linear").
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import numpy as np
import torch

from bundle.evaluate import leave_one_out
from bundle.inference import LearnedMidpoints
from bundle.io import read_sax
from bundle.motion import FlowMidpoints
from bundle.studies import dicom_folder, labelled_stack_paths, lv_centre_from_contours, per_slice_normalised_stack
from bundle.temporal import DEFAULT_FRACTION, fuse_phases, fusion_window
from bundle.upsample import linear_midpoints
from bundle.weights import load_model


class Given:
    """A midpoint predictor that returns slices computed already (to score mixtures of predictions)."""

    def __init__(self, slices):
        self.slices = torch.from_numpy(slices)

    def __call__(self, left, right, gap_mm=None, phase_offset=0):
        return self.slices.to(left.dtype)


def gains(stack, centre, model, scales, fuse):
    """{scale: (heart PSNR gain, heart SSIM gain) over flow}, and over fused flow if ``fuse``;
    "linear": linear interpolation's, the baseline, over flow."""
    learned = LearnedMidpoints(model, model.preprocessor(stack), num_steps=model.info.steps)
    _, pred = leave_one_out(stack, {"linear": linear_midpoints, "flow": FlowMidpoints(), "calid": learned}, centre)
    flow, correction = pred["flow"], pred["calid"] - pred["flow"]
    mixes = {"flow": flow, **{f"{s:g}": flow + s * correction for s in scales}}
    if fuse:
        window = fusion_window(stack.shape[3], DEFAULT_FRACTION)
        mixes.update({f"{k} fused": fuse_phases(torch.from_numpy(v), window).numpy() for k, v in list(mixes.items())})
    mixes["linear"] = pred["linear"]
    scored = leave_one_out(stack, {k: Given(v) for k, v in mixes.items()}, centre)[0]

    def over(name, base):
        a, b = scored[name], scored[base]
        return a["psnr_heart"] - b["psnr_heart"], a["ssim_heart"] - b["ssim_heart"]

    result = {"linear": over("linear", "flow"), **{f"{s:g}": over(f"{s:g}", "flow") for s in scales}}
    if fuse:
        result.update({f"{s:g} fused": over(f"{s:g} fused", "flow fused") for s in scales})
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="+", help="folders of labelled stacks, or DICOM studies")
    parser.add_argument("--weights", type=Path, default=Path("models"))
    parser.add_argument("--scales", default="[0.5, 0.75, 1, 1.25, 1.5]")
    args = parser.parse_args()
    model, scales = load_model(args.weights), ast.literal_eval(args.scales)
    for folder in args.data:
        stacks = labelled_stack_paths(folder)
        if stacks:  # labelled stacks: the mean over stacks, as calid evaluate averages them
            rows = [gains(*per_slice_normalised_stack(p), model, scales, fuse=False) for p in stacks]
        else:
            stack = read_sax(dicom_folder(folder))
            rows = [gains(stack, lv_centre_from_contours(folder), model, scales, fuse=True)]
        for key in rows[0]:
            values = np.array([r[key] for r in rows])
            report = {"data": folder.name, "scale": key, "stacks": len(rows)}
            report.update(psnr_gain_db=float(values[:, 0].mean()), ssim_gain=float(values[:, 1].mean()))
            report["above_flow"] = int((values[:, 0] > 0).sum())
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
