"""Fusion over phases with learnt weights: can a small network, trained on the three training
cines, weigh the registered neighbouring-phase copies of CaLID's slices better than the uniform
average of bundle.temporal?

``predict``: leave-one-out x2 on real cines as `calid evaluate` runs it (every inner slice from
its neighbours two acquisitions apart, every phase), CaLID with the given weights (1 DDIM step,
seed 0, no fallback) and flow; each prediction's copies at the phases up to ``--window`` (5) each side
registered onto it (bundle.temporal.registered_phases), saved per study with the truth and the heart
box, all on the study's robust [0, 1] scale:

    OMP_NUM_THREADS=2 python docs/experiments/learned_phase_fusion.py predict eval/lpf \
        ../shared/data/sunnybrook-scd/SCD0000101 ../shared/data/sunnybrook-scd/SCD0000201 \
        ../shared/data/sunnybrook-scd/SCD0000301 ../shared/data/sunnybrook-scd/SCD0000401

``windows``: the uniform average of bundle.temporal over windows 1-5, each method, and CaLID's fused
slices blended with flow's, per study (gain over plain flow); ``cross``: leave one training cine
out: the fuser trained on the other two, scored on it every ``--val-every`` iterations
(heart-region PSNR gain over the uniform average of the same window):

    OMP_NUM_THREADS=1 python docs/experiments/learned_phase_fusion.py windows eval/lpf
    OMP_NUM_THREADS=1 python docs/experiments/learned_phase_fusion.py cross eval/lpf \
        --iterations 600 --val-every 100 --width 16 [--residual]

The fuser was not trained on all three and not scored on SCD0000401: it never beat the uniform
average in the cross-validation (docs/README.md, "Round 8").

Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bundle.evaluate import heart_box, make_predictors, scores
from bundle.io import read_sax
from bundle.studies import dicom_folder, lv_centre_from_contours
from bundle.temporal import DEFAULT_FRACTION, fusion_window, registered_phases
from bundle.transforms import IntensityScaler
from bundle.weights import load_model

TRAINING = ("SCD0000101", "SCD0000201", "SCD0000301")


def predict(out: Path, studies, weights: str, window: int):
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(weights)
    for study in studies:
        target = out / f"{study.name}.pt"
        if target.exists():
            print(json.dumps({"study": study.name, "cached": str(target)}), flush=True)
            continue
        start = time.perf_counter()
        stack = read_sax(dicom_folder(study))
        scaler = IntensityScaler.fit(stack.array)
        slices = torch.from_numpy(np.ascontiguousarray(stack.array.transpose(2, 3, 0, 1), dtype=np.float64))
        gap = 2 * stack.slice_spacing
        predictors = make_predictors(stack, model, steps=1, seed=0, baselines=False, fallback=False)
        record = {
            "truth": torch.from_numpy(scaler(slices[1:-1].numpy())).float(),
            "box": heart_box(stack, lv_centre_from_contours(study)),
            "gap_mm": gap,
        }
        for name in ("flow", "calid"):
            pred = torch.from_numpy(scaler(predictors[name](slices[:-2], slices[2:], gap).numpy())).float()
            record[name] = pred  # (inner slices, phases, X, Y)
            record[f"{name}_copies"] = registered_copies(pred, window).half()
        torch.save(record, target)
        print(json.dumps({"study": study.name, "seconds": round(time.perf_counter() - start, 1)}), flush=True)


def registered_copies(pred: torch.Tensor, window: int) -> torch.Tensor:
    """(N, T, X, Y) -> (N, T, 2 * window, X, Y): the slices at phases t+1, t-1, t+2, t-2, ...
    (cyclic) registered onto the one at phase t."""
    return torch.stack([copy for _, copy in registered_phases(pred, window)], 2)


class WeightedFusion(nn.Module):
    """Per-pixel softmax weights over the slice and its registered copies, from a small CNN
    shared by every copy (it sees the slice, the copy and their difference, so any window fits);
    the last layer starts at zero, so the untrained fuser is the uniform average. ``residual``
    adds a zero-initialised correction from the fused slice and the copies' spread."""

    def __init__(self, width=24, residual=False):
        super().__init__()

        def block(c_in):
            return nn.Sequential(
                nn.Conv2d(c_in, width, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=2, dilation=2),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=4, dilation=4),
                nn.SiLU(),
                nn.Conv2d(width, 1, 3, padding=1),
            )

        self.score = block(3)
        nn.init.zeros_(self.score[-1].weight)
        nn.init.zeros_(self.score[-1].bias)
        self.residual = block(2) if residual else None
        if residual:
            nn.init.zeros_(self.residual[-1].weight)
            nn.init.zeros_(self.residual[-1].bias)

    def forward(self, own, copies):
        """own (B, 1, H, W), copies (B, K, H, W) -> (B, 1, H, W)."""
        every = torch.cat([own, copies], 1)  # (B, K + 1, H, W)
        b, k, h, w = every.shape
        pairs = torch.stack([own.expand_as(every), every, every - own], 2).reshape(b * k, 3, h, w)
        logits = self.score(pairs).reshape(b, k, h, w)
        fused = (logits.softmax(1) * every).sum(1, keepdim=True)
        if self.residual is not None:
            fused = fused + self.residual(torch.cat([fused, every.std(1, keepdim=True)], 1))
        return fused


def load(out: Path, name: str, method: str, window: int):
    record = torch.load(out / f"{name}.pt")
    copies = record[f"{method}_copies"][:, :, : 2 * window].float()
    own = record[method]
    n, t = own.shape[:2]
    return {
        "own": own.reshape(n * t, 1, *own.shape[2:]),
        "copies": copies.reshape(n * t, 2 * window, *own.shape[2:]),
        "truth": record["truth"].reshape(n * t, 1, *own.shape[2:]),
        "box": record["box"],
    }


def crops(sets, size, batch, generator):
    """A batch of random crops: half over the heart box, half anywhere."""
    own, copies, truth = [], [], []
    for _ in range(batch):
        data = sets[int(torch.randint(len(sets), (1,), generator=generator))]
        i = int(torch.randint(len(data["own"]), (1,), generator=generator))
        x, y = data["own"].shape[-2:]
        if torch.rand((), generator=generator) < 0.5:
            x0, x1, y0, y1 = data["box"]
            cx = int(torch.randint(x0, x1, (1,), generator=generator))
            cy = int(torch.randint(y0, y1, (1,), generator=generator))
            ox, oy = (int(np.clip(c - size // 2, 0, d - size)) for c, d in ((cx, x), (cy, y)))
        else:
            ox = int(torch.randint(x - size + 1, (1,), generator=generator))
            oy = int(torch.randint(y - size + 1, (1,), generator=generator))
        part = (i, slice(None), slice(ox, ox + size), slice(oy, oy + size))
        own.append(data["own"][part])
        copies.append(data["copies"][part])
        truth.append(data["truth"][part])
    return torch.stack(own), torch.stack(copies), torch.stack(truth)


@torch.no_grad()
def fused_scores(fuser, data, margin=16):
    """Heart-region scores of the fuser's slices, of the uniform average and of the
    plain slices; the fuser sees the heart box and ``margin`` pixels around it (beyond its reach)."""
    x0, x1, y0, y1 = data["box"]
    x, y = data["own"].shape[-2:]
    cx0, cx1, cy0, cy1 = max(0, x0 - margin), min(x, x1 + margin), max(0, y0 - margin), min(y, y1 + margin)
    own, copies, truth = (data[k][..., cx0:cx1, cy0:cy1] for k in ("own", "copies", "truth"))
    box = (x0 - cx0, x1 - cx0, y0 - cy0, y1 - cy0)
    out = torch.cat([fuser(own[i : i + 50], copies[i : i + 50]) for i in range(0, len(own), 50)])
    uniform = torch.cat([own, copies], 1).mean(1)
    return tuple(scores(p, truth[:, 0], box) for p in (out[:, 0], uniform, own[:, 0]))


def train(sets, validate, args, log):
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    fuser = WeightedFusion(args.width, args.residual)
    optimiser = torch.optim.Adam(fuser.parameters(), lr=args.lr)
    for iteration in range(1, args.iterations + 1):
        own, copies, truth = crops(sets, args.crop, args.batch, generator)
        loss = (fuser(own, copies) - truth).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if iteration % args.val_every == 0:
            fused, uniform, _ = fused_scores(fuser, validate)
            log({"iteration": iteration, "gain_over_uniform_db": fused["psnr_heart"] - uniform["psnr_heart"]})


def windows(out: Path, most=5):
    """Training-free: the uniform average over windows 1..``most`` of each method, and CaLID's
    fused slice blended with flow's, per cached study (heart PSNR/SSIM gain over plain flow)."""
    for path in sorted(out.glob("SCD*.pt")):
        record = torch.load(path)
        box, truth = record["box"], record["truth"].flatten(0, 1)

        def gain(pred):
            s = scores(pred.flatten(0, 1), truth, box)
            return [round(s["psnr_heart"] - base["psnr_heart"], 4), round(s["ssim_heart"] - base["ssim_heart"], 5)]

        base = scores(record["flow"].flatten(0, 1), truth, box)
        row = {"study": path.stem, "calid": gain(record["calid"])}
        fused = {}
        for method in ("flow", "calid"):
            every = torch.cat([record[method][:, :, None], record[f"{method}_copies"].float()], 2)
            for k in range(1, most + 1):
                fused[method, k] = every[:, :, : 2 * k + 1].mean(2)
                row[f"{method}-w{k}"] = gain(fused[method, k])
        for alpha in (0.25, 0.5):
            row[f"blend{alpha}-w3"] = gain((1 - alpha) * fused["calid", 3] + alpha * fused["flow", 3])
        print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("predict", "windows", "cross"))
    parser.add_argument("out", type=Path)
    parser.add_argument("studies", nargs="*", type=Path)
    parser.add_argument("--weights", default="models")
    parser.add_argument(
        "--window", type=int, default=None, help="copies each side (predict: 5; cross: the default fraction's, 3)"
    )
    parser.add_argument("--method", default="calid", choices=("calid", "flow"))
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--val-every", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--residual", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.stage == "predict":
        return predict(args.out, args.studies, args.weights, args.window or 5)
    if args.stage == "windows":
        return windows(args.out)
    window = args.window or fusion_window(20, DEFAULT_FRACTION)
    settings = {k: getattr(args, k) for k in ("method", "batch", "crop", "lr", "width", "residual", "seed")}
    for held in TRAINING:
        sets = [load(args.out, n, args.method, window) for n in TRAINING if n != held]
        validate = load(args.out, held, args.method, window)

        def log(row, held=held):
            print(json.dumps({"held_out": held, "window": window, **settings, **row}), flush=True)

        train(sets, validate, args, log)


if __name__ == "__main__":
    main()
