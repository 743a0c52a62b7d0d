"""Test-time adaptation (``--adapt N``): fine-tune a copy of a model over flow on the input
study's own triplets before upsampling it.

The input is all a user has: its slices with the neighbours one acquisition either side
(two acquisitions apart, twice the slice spacing) are triplets with a known middle. The
denoiser is fine-tuned on them for ``steps`` iterations with the stage-2 training loss
(:class:`bundle.engines.LatentDiffusionTrainer`: half of each batch at the deterministic
start, with the image-space loss), on crops of the model's training size, augmented as in
training. The VAE stays frozen; the model passed in is not changed.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch

from .errors import InputRefused
from .weights import CaLIDModel

logger = logging.getLogger(__name__)

# a fixed recipe, chosen before any measurement (none of it was tuned on the reported patients)
ADAPT_LR = 2e-5
ADAPT_MEAN_FRACTION = 0.5
ADAPT_IMAGE_LOSS_WEIGHT = 10.0


def check_adaptable(model: CaLIDModel, stack=None):
    """Refuse, before any work, what adaptation cannot use."""
    if model.info.base != "flow" or model.temporal or model.info.prediction != "residual":
        raise InputRefused(
            f"adapt needs a 2D model that corrects the flow midpoint (base flow, prediction residual); "
            f"{model.source} is base {model.info.base}, prediction {model.info.prediction}, "
            f"{model.info.spatial_dims}D"
        )
    if model.network.flow_correction is not None:
        # adapting trains the denoiser on the uncorrected conditioning: it would learn the wrong input
        raise InputRefused(
            f"adapt is not built for weights with a flow-correction head ({model.source}); "
            f"use weights without one, or leave --adapt off"
        )
    if stack is not None and stack.shape[2] < 3:
        raise InputRefused(
            f"adapt needs at least 3 slices (a slice between two others); the input has {stack.shape[2]}"
        )


def adapt_model(model: CaLIDModel, stack, steps: int, device="cpu", seed=0, progress=True) -> CaLIDModel:
    """A copy of ``model`` whose denoiser was fine-tuned for ``steps`` iterations on the triplets
    of ``stack`` (a :class:`bundle.stack.SaxStack`, every phase)."""
    from torch.utils.data import DataLoader

    from .engines import LatentDiffusionTrainer, LatentScale
    from .flow_triplets import FlowTriplets, collect, stack_triplets
    from .handlers import ProgressBar
    from .sampling import make_noise_scheduler

    check_adaptable(model, stack)
    start = time.perf_counter()
    x, y, z, t = stack.shape
    pre = model.preprocessor(stack)
    scanner = torch.from_numpy(np.ascontiguousarray(stack.array.transpose(2, 3, 0, 1), dtype=np.float32))
    slices = pre.forward(scanner.reshape(z * t, 1, x, y))[:, 0]
    slices = slices.reshape(z, t, *slices.shape[-2:]).numpy()
    triplets = stack_triplets(slices, stack.slice_spacing, "the input", gaps=(1,))
    net = model.info.net
    data = FlowTriplets(collect([triplets]), size=net["spatial_size"], augment=True, seed=seed)
    loader = DataLoader(
        data, batch_size=min(net["batch_size"], len(data)), shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    network = copy.deepcopy(model.network).to(device)
    denoiser = network.denoiser.float().requires_grad_(True)
    trainer = LatentDiffusionTrainer(
        device=device,
        max_epochs=1,
        epoch_length=int(steps),
        train_data_loader=loader,
        network=denoiser,
        optimizer=torch.optim.Adam(denoiser.parameters(), ADAPT_LR),
        autoencoder=network.autoencoder,
        noise_scheduler=make_noise_scheduler(**(model.info.noise_schedule or {})),
        latent_scale=LatentScale(model.info.latent_scale),
        prediction=model.info.prediction,
        mean_fraction=ADAPT_MEAN_FRACTION,
        image_loss_weight=ADAPT_IMAGE_LOSS_WEIGHT,
        train_handlers=[ProgressBar()] if progress else None,
    )
    cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # seeded noise and timesteps; the caller's random state is kept
        torch.manual_seed(seed)
        trainer.run()
    network.eval().requires_grad_(False)
    seconds = time.perf_counter() - start
    logger.info("adapted %s to the input: %d steps on %d triplets in %.1f s", model.source, steps, len(data), seconds)
    adapted = CaLIDModel(network, model.info, model.source)
    adapted.adaptation = {"steps": int(steps), "triplets": len(data), "seconds": round(seconds, 1)}
    return adapted


class LeaveOneOutAdapted:
    """A leave-one-out predictor (``predictor(slices[:-2], slices[2:], gap)``) for adapted models
    that never adapts on the slice it is scored on: the slices between even neighbours are
    predicted by a model adapted on the even slices alone, those between odd neighbours by one
    adapted on the odd slices (each sub-stack's own triplets: neighbours four acquisitions apart).
    ``make(model)`` builds the midpoint predictor of an adapted model."""

    def __init__(self, stack, model: CaLIDModel, steps, make, device="cpu", seed=0):
        from .stack import every_nth_slice

        self.adapted = [adapt_model(model, every_nth_slice(stack, p, 2), steps, device, seed) for p in (0, 1)]
        self.predictors = [make(adapted) for adapted in self.adapted]

    def __call__(self, left, right, gap_mm=None, phase_offset=0):
        out = torch.empty_like(left)
        for parity, predictor in enumerate(self.predictors):  # row i: neighbours i and i + 2
            rows = torch.arange(parity, len(left), 2)
            if len(rows):
                out[rows] = predictor(left[rows], right[rows], gap_mm, phase_offset).to(out.dtype)
        return out

    def describe(self):
        return {"adaptation": [adapted.adaptation for adapted in self.adapted]}

    def close(self):
        pass
