"""Gains over the flow midpoint as `calid evaluate` scores them (whole slices in, PSNR/SSIM in
the 80 mm heart region), on labelled stacks (default: the five held-out ED/ES patients), for
CaLID model folders, CaLID training checkpoints (their EMA weights) and the two experiment
networks of regression_over_flow.py. Training validates on 128 x 128 LV crops instead; this
is how much of a crop gain survives on whole slices, and how checkpoints rank there.

    OMP_NUM_THREADS=1 python docs/experiments/whole_slice_gains.py eval/edes_val \
        --models "[models]" --checkpoints "[runs/diffusion_latent_inputs/checkpoints/checkpoint_900.pt]" \
        --regression eval/regression_over_flow/best.pt --flow-correction eval/flow_correction/best.pt

A checkpoint is exported beside itself (``NAME_model/``) with the VAE and the record of its run
(``RUN/autoencoder/autoencoder.pt``, ``RUN/best.json``), and with the run's flow-correction head
(``RUN/flow_correction.pt``) if it was trained over one. Prints one JSON line per network; with
``--report FILE`` also writes every stack's scores as `calid evaluate` does (``labelled_stacks``,
each slice's too), for paired_gains.py.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import torch

from bundle.evaluate import leave_one_out
from bundle.inference import LearnedMidpoints
from bundle.motion import FlowMidpoints, flow_conditioning
from bundle.studies import labelled_stack_paths, per_slice_normalised_stack
from bundle.upsample import linear_midpoints
from bundle.weights import export_run, load_model

sys.path.insert(0, str(Path(__file__).parent))
from regression_over_flow import HEADS  # noqa: E402


class ExperimentMidpoints:
    """A regression_over_flow.py network as a midpoint predictor (stacks already per-slice normalised)."""

    def __init__(self, head, path):
        self.net = HEADS[head]()
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.net.eval()

    @torch.no_grad()
    def __call__(self, left, right, gap_mm=None, phase_offset=0):
        gaps, phases, x, y = left.shape
        cond = flow_conditioning(left.reshape(-1, 1, x, y).float(), right.reshape(-1, 1, x, y).float())
        pred = self.net(cond, torch.full((gaps * phases,), float(gap_mm)))
        return pred.reshape(gaps, phases, x, y).to(left.dtype)


def export_checkpoint(path: Path) -> Path:
    """A training checkpoint's EMA denoiser with its run's VAE, as a model folder beside it."""
    run = path.parent.parent
    folder = path.with_name(path.stem + "_model")
    state = torch.load(path, map_location="cpu", weights_only=False)["ema"]
    weights = path.with_name(path.stem + "_ema.pt")
    torch.save({k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}, weights)
    weights.with_suffix(".json").write_text((run / "best.json").read_text())
    return export_run(run, folder, weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stacks", type=Path)
    parser.add_argument("--patients", help="a Python list: only these patients' stacks (default: all in STACKS)")
    parser.add_argument("--models", default="[]", help="a Python list of model folders")
    parser.add_argument("--checkpoints", default="[]", help="a Python list of training checkpoints")
    parser.add_argument("--regression", type=Path, help="regression_over_flow.py's best.pt (head residual)")
    parser.add_argument("--flow-correction", type=Path, help="its best.pt with --head flow")
    parser.add_argument("--report", type=Path, help="write the stacks' scores here (JSON)")
    args = parser.parse_args()
    folders = [Path(m) for m in ast.literal_eval(args.models)]
    folders += [export_checkpoint(Path(c)) for c in ast.literal_eval(args.checkpoints)]
    models = {str(f): load_model(f) for f in folders}
    experiments = {}
    if args.regression:
        experiments["regression (e)"] = ExperimentMidpoints("residual", args.regression)
    if args.flow_correction:
        experiments["flow correction (c)"] = ExperimentMidpoints("flow", args.flow_correction)
    gains = {name: [] for name in ["linear", *models, *experiments]}  # linear: the baseline beside flow
    per_stack = {}
    patients = ast.literal_eval(args.patients) if args.patients else None
    for path in labelled_stack_paths(args.stacks, patients=patients):
        stack, centre = per_slice_normalised_stack(path)
        predictors = {"linear": linear_midpoints, "flow": FlowMidpoints(), **experiments}
        predictors.update(
            {name: LearnedMidpoints(m, m.preprocessor(stack), num_steps=m.info.steps) for name, m in models.items()}
        )
        scores = per_stack[path.name[: -len(".nii.gz")]] = leave_one_out(stack, predictors, centre)[0]
        for name in gains:
            gains[name].append(
                (
                    scores[name]["psnr_heart"] - scores["flow"]["psnr_heart"],
                    scores[name]["ssim_heart"] - scores["flow"]["ssim_heart"],
                )
            )
    if args.report:
        args.report.write_text(json.dumps({"real": {}, "labelled_stacks": per_stack}, indent=1))
    for name, rows in gains.items():
        report = {
            "network": name,
            "stacks": len(rows),
            "psnr_gain_db": sum(r[0] for r in rows) / len(rows),
            "ssim_gain": sum(r[1] for r in rows) / len(rows),
            "above_flow": sum(r[0] > 0 for r in rows),
        }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
