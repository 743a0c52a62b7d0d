"""Test-time adaptation (``--adapt N``): fine-tune a copy of a model over flow on the input
study's own triplets before upsampling it.

The input is all a user has: its slices with the neighbours one acquisition either side
(two acquisitions apart, twice the slice spacing) are triplets with a known middle, cropped to
the model's training size around the image centre and augmented as in training. What is
fine-tuned depends on the weights; the VAE always stays frozen and the model passed in is
never changed:
- with a flow-correction head (the shipped weights since 0.8.0): the head alone, through the
  frozen denoiser, on the slice CaLID returns (the loss the head was trained with in 0.9.0);
- without one: the denoiser, with the stage-2 training loss
  (:class:`bundle.engines.LatentDiffusionTrainer`: half of each batch at the deterministic
  start, with the image-space loss).
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

# the denoiser's recipe, fixed before any measurement (none of it was tuned on the reported patients)
ADAPT_LR = 2e-5
ADAPT_MEAN_FRACTION = 0.5
ADAPT_IMAGE_LOSS_WEIGHT = 10.0
# the head's learning rate (Adam): of 2e-5 and 1e-4, the better on the training cines
# (docs/experiments/adapt_head.py; docs/README.md "Round 9": it still loses on SCD0000401)
ADAPT_HEAD_LR = 1e-4


def check_adaptable(model: CaLIDModel, stack=None):
    """Refuse, before any work, what adaptation cannot use."""
    if model.info.base != "flow" or model.temporal or model.info.prediction != "residual":
        raise InputRefused(
            f"adapt needs a 2D model that corrects the flow midpoint (base flow, prediction residual); "
            f"{model.source} is base {model.info.base}, prediction {model.info.prediction}, "
            f"{model.info.spatial_dims}D"
        )
    if model.network.flow_correction is not None and model.info.start != "mean":
        # the head learns through the sampler from the mean start, as it was trained
        raise InputRefused(f"adapt trains a flow-correction head from the mean start; {model.source} starts from noise")
    if stack is not None and stack.shape[2] < 3:
        raise InputRefused(
            f"adapt needs at least 3 slices (a slice between two others); the input has {stack.shape[2]}"
        )


def own_triplets(model: CaLIDModel, stack, seed=0):
    """The triplets of ``stack`` (every phase; neighbours one acquisition either side, flow
    computed on whole slices) as augmented training crops of the model's size."""
    from .flow_triplets import FlowTriplets, collect, stack_triplets

    x, y, z, t = stack.shape
    pre = model.preprocessor(stack)
    scanner = torch.from_numpy(np.ascontiguousarray(stack.array.transpose(2, 3, 0, 1), dtype=np.float32))
    slices = pre.forward(scanner.reshape(z * t, 1, x, y))[:, 0]
    slices = slices.reshape(z, t, *slices.shape[-2:]).numpy()
    triplets = stack_triplets(slices, stack.slice_spacing, "the input", gaps=(1,))
    return FlowTriplets(collect([triplets]), size=model.info.net["spatial_size"], augment=True, seed=seed)


def _loader(model, data, seed):
    from torch.utils.data import DataLoader

    batch = min(model.info.net["batch_size"], len(data))
    return DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))


def adapting_head(model: CaLIDModel, stack, device="cpu", seed=0, lr=ADAPT_HEAD_LR):
    """Adapt a copy of ``model``'s flow-correction head to ``stack``: yields (step, the copy)
    before the first step and after each one, without end (the copy is trained in place: use
    or copy it before taking the next). Deterministic: no random draws but the seeded crops
    and batches, and the mean start."""
    import torch.nn.functional as F

    check_adaptable(model, stack)
    data = own_triplets(model, stack, seed)
    network = copy.deepcopy(model.network).to(device).float().eval().requires_grad_(False)
    head = network.flow_correction.requires_grad_(True)
    sampler = network.sampler(model.info.steps)
    optimizer = torch.optim.Adam(head.parameters(), lr)
    adapted = CaLIDModel(network, model.info, model.source)
    adapted.adaptation = {"trained": "flow_correction", "triplets": len(data)}
    step = 0
    yield step, adapted
    loader = _loader(model, data, seed)
    while True:
        for batch in loader:
            gap, truth = batch["gap_mm"].to(device), batch["image"].to(device)
            pred = sampler.sample_over_flow(head(batch["neighbours"].to(device), gap), gap)
            loss = F.l1_loss(pred, truth)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            yield step, adapted


def _adapt_head(model, stack, steps, device, seed, progress):
    from tqdm.auto import tqdm

    with tqdm(total=steps, desc="adapting the flow correction", unit="step", disable=not progress) as bar:
        for step, adapted in adapting_head(model, stack, device, seed):
            if step == steps:
                return adapted
            bar.update(1)


def _adapt_denoiser(model, stack, steps, device, seed, progress):
    from .engines import LatentDiffusionTrainer, LatentScale
    from .handlers import ProgressBar
    from .sampling import make_noise_scheduler

    data = own_triplets(model, stack, seed)
    network = copy.deepcopy(model.network).to(device)
    denoiser = network.denoiser.float().requires_grad_(True)
    trainer = LatentDiffusionTrainer(
        device=device,
        max_epochs=1,
        epoch_length=int(steps),
        train_data_loader=_loader(model, data, seed),
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
    adapted = CaLIDModel(network, model.info, model.source)
    adapted.adaptation = {"trained": "denoiser", "triplets": len(data)}
    return adapted


def adapt_model(model: CaLIDModel, stack, steps: int, device="cpu", seed=0, progress=True) -> CaLIDModel:
    """A copy of ``model`` fine-tuned for ``steps`` iterations on the triplets of ``stack`` (a
    :class:`bundle.stack.SaxStack`, every phase): its head if it has one, else its denoiser."""
    check_adaptable(model, stack)
    start = time.perf_counter()
    adapt = _adapt_head if model.network.flow_correction is not None else _adapt_denoiser
    adapted = adapt(model, stack, int(steps), device, seed, progress)
    adapted.network.eval().requires_grad_(False)
    seconds = time.perf_counter() - start
    adapted.adaptation.update(steps=int(steps), seconds=round(seconds, 1))
    logger.info(
        "adapted %s (%s) to the input: %d steps on %d triplets in %.1f s",
        model.source,
        adapted.adaptation["trained"],
        steps,
        adapted.adaptation["triplets"],
        seconds,
    )
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
