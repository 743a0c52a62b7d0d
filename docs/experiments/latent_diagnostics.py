"""Where CaLID over flow loses against its ceiling, on the held-out ED/ES triplets (128 x 128
crops around the LV, neighbours one acquisition either side), gains over the flow midpoint:
- the latent residual ceiling: the true residual decoded, m + D(z(s)) - D(z(m));
- the VAE's reconstruction of the truth, D(z(s));
- with a training checkpoint: its EMA denoiser sampled with 1 and 4 DDIM steps, from seeded noise
  and from the prior's mean (zero).

    python docs/experiments/latent_diagnostics.py [--checkpoint runs/diffusion_flow/checkpoints/checkpoint_N.pt]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bundle.flow_triplets import HELD_OUT_PATIENTS, FlowTriplets, collect, labelled_stack_triplets
from bundle.metrics import psnr, ssim
from bundle.networks import build_denoiser, preset
from bundle.sampling import SliceSampler
from bundle.studies import labelled_stack_paths
from bundle.weights import load_model

ROOT = Path(__file__).resolve().parents[2]
LABELLED = ROOT.parent / "shared" / "data" / "sunnybrook-scd-edes"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--vae", type=Path, default=ROOT / "models")
    args = parser.parse_args()
    parts = [labelled_stack_triplets(p, gaps=(1,)) for p in labelled_stack_paths(LABELLED, patients=HELD_OUT_PATIENTS)]
    val = FlowTriplets(collect(parts), size=(128, 128), augment=False)
    items = [val[i] for i in range(len(val))]
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
    truth, base, cond, gap = batch["image"], batch["base"], batch["neighbours"], batch["gap_mm"]

    def gain(pred):
        return {
            "psnr": round(float((psnr(pred, truth) - psnr(base, truth)).mean()), 3),
            "ssim": round(float((ssim(pred, truth) - ssim(base, truth)).mean()), 4),
        }

    vae = load_model(args.vae).network.autoencoder.eval()
    report = {"triplets": len(items)}
    with torch.no_grad():
        z_truth, z_base = vae.encode(truth)[0], vae.encode(base)[0]
        report["latent_residual_ceiling"] = gain(base + vae.decode(z_truth) - vae.decode(z_base))
        report["vae_reconstruction"] = gain(vae.decode(z_truth))
        if args.checkpoint is not None:
            checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
            denoiser = build_denoiser(2, dict(preset("cpu"), conditioning_channels=4, gap_classes=64))
            ema = {k[len("module.") :]: v for k, v in checkpoint["ema"].items() if k.startswith("module.")}
            denoiser.load_state_dict(ema)
            denoiser.eval()
            scale = checkpoint["latent_scale"]["value"]
            for steps in (1, 4):
                sampler = SliceSampler(vae, denoiser, scale, num_steps=steps)
                shape = sampler.latent_shape(cond)
                starts = {
                    "noise": torch.randn(shape, generator=torch.Generator().manual_seed(0)),
                    "mean": torch.zeros(shape),
                }
                for name, z in starts.items():
                    pred = sampler(cond, z_start=z, base=base, gap_mm=gap)
                    report[f"{steps}_steps_from_{name}"] = gain(pred)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
