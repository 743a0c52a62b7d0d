"""The reference every learned variant over flow is compared with: a plain pixel-space regression
U-Net fed what CaLID over flow sees (the neighbours warped half way, the flow midpoint, its
weight, and the gap as a constant channel), predicting the residual to the flow midpoint
(output convolution zero-initialised: it starts at flow exactly), L1, Adam. Same triplets, same
held-out ED/ES patients for choosing the checkpoint, as configs/train_diffusion_flow.json.

With ``--head flow`` the same U-Net is instead alternative (c), a learned flow correction as
video frame interpolation networks make one: it predicts a displacement update for each
half-way-warped neighbour and softmax weights over three candidates (the two re-warped
neighbours and the flow midpoint; the output convolution starts at zero with the midpoint's
weight near 1, so it starts at flow), and returns their blend: it can move and occlude, not
paint.

Reports the gain over flow (PSNR, SSIM; 128 x 128 crops around the LV, `--val-crop`) on the held-out ED/ES
patients and on SCD0000401 leave-one-out (neighbours two acquisitions apart, every phase),
as JSON on stdout and in OUT/report.json.

    OMP_NUM_THREADS=2 python docs/experiments/regression_over_flow.py OUT --minutes 15 [--head flow]

``--score BEST_PT`` trains nothing: it scores a trained network on the crops of its own training
triplets (the three cine studies, the ED/ES training patients; every triplet one acquisition
apart, at most 400 of each, evenly spread) beside the held-out ones, to tell memorising from
generalising.

``--iterations N`` stops after N iterations as well (the time box alone ends at a different
iteration on every machine; two threads instead of one gave other weights, most likely through
torch's CPU reductions); ``--init BEST_PT`` continues a run, which must then beat its start.
The flow-correction head shipped in 0.8.0 is ``--head flow`` chosen at iteration 1,200; the 0.9.0
head is that one trained further through the frozen denoiser (head_through_denoiser.py).
``calid attach-flow-correction`` adds such a head to a model folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from torch.utils.data import Subset

from bundle.data import evenly_spread
from bundle.flow_triplets import (
    HELD_OUT_PATIENTS,
    FlowTriplets,
    collect,
    labelled_stack_triplets,
    phantom_triplets,
    study_triplets,
)
from bundle.metrics import psnr, ssim
from bundle.networks import FlowCorrection, gap_plane
from bundle.studies import labelled_stack_paths

ROOT = Path(__file__).resolve().parents[2]
CINE = ROOT.parent / "shared" / "data" / "sunnybrook-scd"
LABELLED = ROOT.parent / "shared" / "data" / "sunnybrook-scd-edes"


class RegressionOverFlow(torch.nn.Module):
    def __init__(self, features=(16, 32, 48, 64, 64, 16)):
        super().__init__()
        self.unet = BasicUNet(spatial_dims=2, in_channels=5, out_channels=1, features=features)
        torch.nn.init.zeros_(self.unet.final_conv.weight)
        torch.nn.init.zeros_(self.unet.final_conv.bias)

    def forward(self, conditioning, gap_mm):
        return conditioning[:, 2:3] + self.unet(torch.cat([conditioning, gap_plane(gap_mm, conditioning)], 1))


class FlowCorrectionOverFlow(FlowCorrection):
    """(c): the bundle's flow-correction head, scored by the midpoint it returns."""

    def forward(self, conditioning, gap_mm):
        return super().forward(conditioning, gap_mm)[:, 2:3]


HEADS = {"residual": RegressionOverFlow, "flow": FlowCorrectionOverFlow}


def time_boxed(loader, minutes, iterations=None, done_before=0):
    """(iteration, batch), epoch after epoch, numbered on from ``done_before``, until ``minutes``
    have passed since the first batch was asked for or ``iterations`` are done."""
    start, iteration = time.time(), done_before

    def done():  # asked before the next batch is drawn, so none is drawn in vain
        return time.time() - start > minutes * 60 or (iterations and iteration >= iterations)

    while not done():
        for batch in loader:
            iteration += 1
            yield iteration, batch
            if done():
                return


def batches(dataset, size):
    for start in range(0, len(dataset), size):
        items = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
        yield {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


@torch.no_grad()
def score(model, dataset):
    """Mean PSNR/SSIM gain over flow (the base) on a fixed dataset."""
    model.eval()
    gains = {"psnr": [], "ssim": []}
    for batch in batches(dataset, 16):
        pred = model(batch["neighbours"], batch["gap_mm"]).clamp(-0.5, 1.5)
        truth, base = batch["image"], batch["base"]
        gains["psnr"].append(psnr(pred, truth) - psnr(base, truth))
        gains["ssim"].append(ssim(pred, truth) - ssim(base, truth))
    model.train()
    return {k: float(torch.cat(v).mean()) for k, v in gains.items()}


def cine_parts(gaps=(1, 2)):
    return [study_triplets(CINE / s, gaps=gaps) for s in ("SCD0000101", "SCD0000201", "SCD0000301")]


def edes_parts(held_out=False, gaps=(1, 2)):
    """The ED/ES training patients' triplets, or with ``held_out`` the five choosing ones'."""
    which = {"patients": HELD_OUT_PATIENTS} if held_out else {"exclude": HELD_OUT_PATIENTS}
    return [labelled_stack_triplets(p, gaps=gaps) for p in labelled_stack_paths(LABELLED, **which)]


def training_parts():
    """The training triplets of configs/train_diffusion_flow.json: cine studies, ED/ES, phantoms."""
    return cine_parts() + edes_parts() + [phantom_triplets(s) for s in (1000, 1001, 1002, 1003)]


def score_in_and_out_of_sample(args):
    model = HEADS[args.head]()
    model.load_state_dict(torch.load(args.score, map_location="cpu", weights_only=True))
    groups = {
        "cine_training": cine_parts(gaps=(1,)),
        "edes_training": edes_parts(gaps=(1,)),
        "edes_held_out": edes_parts(held_out=True, gaps=(1,)),
        "SCD0000401": [study_triplets(CINE / "SCD0000401", gaps=(1,))],
    }
    report = {"network": str(args.score), "head": args.head, "crop": args.val_crop}
    for name, parts in groups.items():
        crops = FlowTriplets(collect(parts), size=(args.val_crop, args.val_crop), augment=False)
        picked = Subset(crops, evenly_spread(len(crops), 400))
        report[name] = {"triplets": len(picked), **score(model, picked)}
    args.out.joinpath("in_and_out_of_sample.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--iterations", type=int, help="also stop after this many iterations")
    parser.add_argument("--crop", type=int, default=96, help="training crops (256: whole Sunnybrook slices)")
    parser.add_argument("--val-crop", type=int, default=128, help="validation crops, around the LV")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head", choices=sorted(HEADS), default="residual")
    parser.add_argument("--init", type=Path, help="continue from this best.pt (chosen against its own score)")
    parser.add_argument("--score", type=Path, help="train nothing: score this best.pt in and out of sample")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.score:
        return score_in_and_out_of_sample(args)
    torch.manual_seed(args.seed)
    train_parts, val_parts = training_parts(), edes_parts(held_out=True, gaps=(1,))
    train = FlowTriplets(collect(train_parts), size=(args.crop, args.crop), augment=True, seed=args.seed)
    val_size = (args.val_crop, args.val_crop)
    val = FlowTriplets(collect(val_parts), size=val_size, augment=False)
    test = FlowTriplets(collect([study_triplets(CINE / "SCD0000401", gaps=(1,))]), size=val_size, augment=False)
    model = HEADS[args.head]()
    if args.init:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.995))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True)
    best, history, iteration, start = {"psnr": 0.0, "iteration": 0}, [], 0, time.time()
    if args.init:  # what it continues from must be beaten, as flow must be from scratch
        best = {**score(ema.module, val), "iteration": 0}
    torch.save(ema.module.state_dict(), args.out / "best.pt")  # the start until something beats it

    for iteration, batch in time_boxed(loader, args.minutes, args.iterations):
        loss = F.l1_loss(model(batch["neighbours"], batch["gap_mm"]), batch["image"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
        if iteration % args.val_every == 0:
            gain = score(ema.module, val)
            history.append({"iteration": iteration, "loss": loss.item(), "val_gain": gain})
            print(json.dumps(history[-1]), flush=True)
            if gain["psnr"] > best["psnr"]:
                best = {**gain, "iteration": iteration}
                torch.save(ema.module.state_dict(), args.out / "best.pt")
    model.load_state_dict(torch.load(args.out / "best.pt", weights_only=True))
    report = {
        "head": args.head,
        "iterations": iteration,
        "minutes": round((time.time() - start) / 60, 1),
        "chosen": best,
        "edes_validation_gain_over_flow": score(model, val),
        "SCD0000401_gain_over_flow": score(model, test),
        "SCD0000401_triplets": len(test),
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
