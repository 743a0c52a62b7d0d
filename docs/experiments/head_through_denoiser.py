"""Fine-tune a model's flow-correction head (and, with ``--denoiser-lr``, its denoiser) through the
whole CaLID sampler: the loss is on the slice CaLID returns (1 DDIM step from the mean start, as
shipped) on whole slices, not on the head's own midpoint or on a latent.

The head and the denoiser of the 0.8.0 weights were trained apart (the head against the truth,
the denoiser over plain flow), and a better head alone made CaLID over it worse: each partly does
the other's work. Here the head learns the conditioning that makes the denoiser's output best
(0.9.0), and the denoiser may learn with it (measured in 0.9.1); the VAE stays frozen. Same training
triplets as configs/train_diffusion_flow.json (3 cine studies, the ED/ES training patients,
4 phantoms; flow computed once, on whole slices); the checkpoint is chosen on the held-out ED/ES
patients' whole slices, scored in the LV-centred square of ``--score-px`` pixels (the 80 mm heart
region of `calid evaluate`), against the start.

    OMP_NUM_THREADS=2 python docs/experiments/head_through_denoiser.py OUT --weights models --minutes 40

``--init HEAD.pt`` continues from an earlier run's head (which must then be beaten); ``--resume``
continues this run where its last validation left it (OUT/last.pt: networks, EMA, optimizer), for
another ``--minutes``.
``--denoiser-lr LR`` trains the denoiser with the head (at its own, smaller rate) and also writes
the chosen weights as a model folder, OUT/best_model, for ``calid evaluate --weights``.
Writes OUT/best.pt (the head's EMA weights, a plain state dict for ``calid attach-flow-correction``)
and OUT/report.json (the validation history: gain of CaLID over the flow midpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bundle.flow_triplets import FlowTriplets, collect, crop_origin
from bundle.io import atomic_write
from bundle.metrics import psnr, ssim
from bundle.weights import load_model, write_model_folder

sys.path.insert(0, str(Path(__file__).parent))
from regression_over_flow import edes_parts, time_boxed, training_parts  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def heart_square(images, centres, px):
    """The ``px`` square of each image around its LV centre, as training crops are placed."""
    origins = [crop_origin(c, (px, px), images.shape[-2:]) for c in centres.tolist()]
    return torch.stack([image[..., x0 : x0 + px, y0 : y0 + px] for image, (x0, y0) in zip(images, origins)])


@torch.no_grad()
def validate(head, sampler, data, px, chunk=8):
    """Mean gain of CaLID over the head's conditioning (and of the head alone) over the flow
    midpoint, whole slices in, scored in the heart square."""
    gains = {"calid_psnr": [], "calid_ssim": [], "head_psnr": []}
    for start in range(0, len(data["gap_mm"]), chunk):
        sl = slice(start, start + chunk)
        flow_cond, truth, gap = data["neighbours"][sl].float(), data["image"][sl].float(), data["gap_mm"][sl]
        cond = head(flow_cond, gap)
        pred = sampler.sample_over_flow(cond, gap)
        lo = torch.minimum(flow_cond[:, 0:1], flow_cond[:, 1:2]).amin((2, 3), keepdim=True)
        hi = torch.maximum(flow_cond[:, 0:1], flow_cond[:, 1:2]).amax((2, 3), keepdim=True)
        pred = torch.maximum(torch.minimum(pred, hi), lo)  # inference clamps to the (unwarped) neighbours' range
        square = lambda x: heart_square(x, data["centre"][sl], px)  # noqa: E731
        t, flow = square(truth), square(flow_cond[:, 2:3])
        gains["calid_psnr"].append(psnr(square(pred), t) - psnr(flow, t))
        gains["calid_ssim"].append(ssim(square(pred), t) - ssim(flow, t))
        gains["head_psnr"].append(psnr(square(cond[:, 2:3]), t) - psnr(flow, t))
    return {k: float(torch.cat(v).mean()) for k, v in gains.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--weights", type=Path, default=ROOT / "models", help="a model folder with a head")
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--iterations", type=int, help="also stop after this many iterations")
    parser.add_argument("--crop", type=int, default=128, help="training crops around the LV (256: whole slices)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--score-px", type=int, default=58)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="continue from this head (a best.pt of an earlier run)")
    parser.add_argument("--denoiser-lr", type=float, default=0.0, help="train the denoiser too, at this rate")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    args = parser.parse_args()
    last = args.out / "last.pt"  # written at every validation; --resume continues from it
    if args.resume and not last.is_file():  # refused in one line, before anything is made or read
        parser.exit(2, f"{parser.prog}: error: --resume: {last} does not exist\n")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = load_model(args.weights)
    network = model.network
    head, sampler = network.flow_correction, network.sampler(1)
    if head is None or model.info.base != "flow" or model.info.start != "mean":
        raise SystemExit(f"{args.weights}: a residual model over flow with a head and the mean start is needed")
    if args.init:
        head.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    network.requires_grad_(False)
    head.requires_grad_(True).train()
    groups = [{"params": list(head.parameters()), "lr": args.lr}]
    if args.denoiser_lr:
        network.denoiser.requires_grad_(True).train()
        groups.append({"params": list(network.denoiser.parameters()), "lr": args.denoiser_lr})
    train_parts, val_parts = training_parts(), edes_parts(held_out=True, gaps=(1,))
    train = FlowTriplets(collect(train_parts), size=(args.crop, args.crop), augment=True, seed=args.seed)
    val = collect(val_parts)
    # the EMA copy of the whole network (the frozen parts stay equal) validates and is saved
    ema = torch.optim.swa_utils.AveragedModel(network, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.995))
    ema.module.eval()
    ema_head, ema_sampler = ema.module.flow_correction, ema.module.sampler(1)
    optimizer = torch.optim.Adam(groups)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True)

    def save_best():
        torch.save(ema_head.state_dict(), args.out / "best.pt")
        if args.denoiser_lr:
            state = {k: v.half() if v.is_floating_point() else v for k, v in ema.module.state_dict().items()}
            record = {"command": " ".join(sys.argv), "from": str(args.weights), "chosen": best}
            write_model_folder(
                args.out / "best_model",
                state,
                model.info.updated(extra={**model.info.extra, "fine_tune_record": record}),
            )

    def checkpoint():
        state = {"network": network.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}
        state.update(iteration=iteration, best=best, history=history)
        atomic_write(last, lambda tmp: torch.save(state, tmp))

    if args.resume:
        state = torch.load(last, map_location="cpu", weights_only=True)
        network.load_state_dict(state["network"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        iteration, best, history = state["iteration"], state["best"], state["history"]
    else:
        best = {**validate(ema_head, ema_sampler, val, args.score_px), "iteration": 0}  # the start must be beaten
        history, iteration = [best], 0
        print(json.dumps(best), flush=True)
        save_best()
    start = time.time()

    for iteration, batch in time_boxed(loader, args.minutes, args.iterations, iteration):
        pred = sampler.sample_over_flow(head(batch["neighbours"], batch["gap_mm"]), batch["gap_mm"])
        loss = F.l1_loss(pred, batch["image"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(network)
        if iteration % args.val_every == 0:
            gain = validate(ema_head, ema_sampler, val, args.score_px)
            history.append({**gain, "iteration": iteration, "loss": loss.item(), "minutes": (time.time() - start) / 60})
            print(json.dumps(history[-1]), flush=True)
            torch.save(ema_head.state_dict(), args.out / f"head_{iteration}.pt")
            if gain["calid_psnr"] > best["calid_psnr"]:
                best = {**gain, "iteration": iteration}
                save_best()
            (args.out / "report.json").write_text(json.dumps({"chosen": best, "history": history}, indent=2))
            checkpoint()
    report = {"weights": str(args.weights), "iterations": iteration, "chosen": best, "history": history}
    report["minutes"] = round((time.time() - start) / 60, 1)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
