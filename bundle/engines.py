"""Ignite training engines for the two CaLID stages, on MONAI's ``Trainer``, and the training
state they keep: EMA, warm-up, random state, latent scale.

Stage 1 trains the VAE (L1 + KL + PatchGAN + perceptual); stage 2 freezes it and trains the
conditioned latent denoiser. Both autocast on CUDA only (bf16 where supported, else fp16 with a
gradient scaler; :mod:`bundle.devices`), clip gradients and keep an EMA of the weights. The
handlers they share are in :mod:`bundle.handlers`, the weight files in :mod:`bundle.weights`.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
import torch.nn.functional as F
from monai.engines import Trainer
from monai.inferers import SimpleInferer
from monai.losses import PatchAdversarialLoss, SSIMLoss
from torch.optim.swa_utils import AveragedModel

from .devices import as_device_tensor, needs_grad_scaler, precision_context, unwrap
from .losses import kl_divergence
from .options import as_flag
from .sampling import DEFAULT_PREDICTION, PREDICTIONS, conditioning_latents
from .transforms import central_square

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int):
    """Seed python, numpy and torch (CPU runs are then deterministic)."""
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def make_ema(network, decay=0.999):
    """EMA of the weights. The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first
    updates, so that short runs (and early validations) do not score the random init."""

    def ema_update(ema_params, current_params, num_averaged):
        n = float(num_averaged)
        torch._foreach_lerp_(ema_params, current_params, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return AveragedModel(unwrap(network), multi_avg_fn=ema_update)


def warmup_constant(optimizer, warmup_iterations: int):
    """Linear warm-up over ``warmup_iterations``, then the optimiser's learning rate."""
    warmup = max(1, int(warmup_iterations))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, (it + 1) / warmup))


class RNGState:
    """Checkpointable random state of python, numpy and torch."""

    def state_dict(self):
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state):
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])


class LatentScale:
    """The latent scale factor 1 / std(z), computed once from the first training batch and
    checkpointed, so a resumed run keeps it."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


# ----------------------------------------------------------------------------- trainers


class _CaLIDTrainer(Trainer):
    """Shared parts of both stages: the network and its optimiser, autocast per device,
    gradient clipping, the EMA update. Each stage's ``_iteration`` computes its own losses and
    returns them as scalars (the engine's output, for the log handlers)."""

    def __init__(
        self,
        device,
        max_epochs,
        train_data_loader,
        network,
        optimizer,
        inferer=None,
        ema=None,
        grad_clip=1.0,
        amp=True,
        train_handlers=None,
        epoch_length=None,
    ):
        # MONAI's own AMP (CUDA fp16 with a scaler) is replaced by the per-device choice below
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            handlers=train_handlers,
            amp=False,
            decollate=False,
        )
        self.network, self.optimizer = network, optimizer
        self.inferer = inferer or SimpleInferer()  # runs the network's training forward
        self.device = torch.device(device)
        self.precision = "auto" if as_flag(amp, "amp") else "fp32"
        self.grad_scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(self.device, self.precision) else None
        self.ema = ema
        self.grad_clip = grad_clip

    def autocast(self):
        return precision_context(self.device, self.precision)

    def _backward_step(self, loss, network, optimizer):
        optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(optimizer)
        else:
            loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.grad_clip)
        if self.grad_scaler is not None:
            self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        else:
            optimizer.step()


class AutoencoderTrainer(_CaLIDTrainer):
    """Stage 1: the VAE learns all three slices of each triplet (L1 + KL + adversarial + perceptual)."""

    def __init__(
        self,
        *args,
        discriminator,
        d_optimizer,
        perceptual,
        kl_weight=1e-6,
        adv_weight=0.01,
        perceptual_weight=0.3,
        adv_start_iteration=0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.perceptual = perceptual
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self.kl_weight, self.adv_weight, self.perceptual_weight = kl_weight, adv_weight, perceptual_weight
        self.adv_start_iteration = adv_start_iteration

    def _iteration(self, engine, batchdata):
        middle = as_device_tensor(batchdata["image"], self.device)
        neighbours = as_device_tensor(batchdata["neighbours"], self.device)
        images = torch.cat([middle, neighbours.flatten(0, 1).unsqueeze(1)], 0)  # every slice is a sample
        use_adv = self.adv_weight > 0 and engine.state.iteration >= self.adv_start_iteration
        self.network.train()
        with self.autocast():
            recon, z_mu, z_sigma = self.inferer(images, self.network)
            l1 = F.l1_loss(recon.float(), images)
            kl = kl_divergence(z_mu.float(), z_sigma.float())
            perceptual = self.perceptual(recon.float(), images) if self.perceptual_weight > 0 else recon.new_zeros(())
            loss = l1 + self.kl_weight * kl + self.perceptual_weight * perceptual
            adv_g = recon.new_zeros(())
            if use_adv:
                adv_g = self.adversarial(
                    self.discriminator(recon.float())[-1], target_is_real=True, for_discriminator=False
                )
                loss = loss + self.adv_weight * adv_g
        self._backward_step(loss, self.network, self.optimizer)
        adv_d = torch.zeros(())
        if use_adv:
            with self.autocast():
                # one forward for fake and real: DistributedDataParallel wants one per backward
                logits = self.discriminator(torch.cat([recon.detach().float(), images]))[-1]
                fake, real = logits.chunk(2)
                adv_d = 0.5 * (
                    self.adversarial(fake, target_is_real=False, for_discriminator=True)
                    + self.adversarial(real, target_is_real=True, for_discriminator=True)
                )
            self._backward_step(self.adv_weight * adv_d, self.discriminator, self.d_optimizer)
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.network))
        return {
            "loss": loss.item(),
            "l1": l1.item(),
            "kl": kl.item(),
            "perceptual": perceptual.item(),
            "adv_g": adv_g.item(),
            "adv_d": adv_d.item(),
        }


class LatentDiffusionTrainer(_CaLIDTrainer):
    """Stage 2: the frozen VAE encodes s(n); the conditioned denoiser learns the noise added at a
    random timestep (epsilon), or the clean latent correction to a base slice (residual), given
    the noisy latent and the conditioning in image space: the two neighbours, or over flow the
    warped neighbours, the flow midpoint and its weight, with the midpoint as the base."""

    def __init__(
        self,
        *args,
        autoencoder,
        noise_scheduler,
        latent_scale: LatentScale,
        prediction=DEFAULT_PREDICTION,
        mean_fraction=0.0,
        image_loss_weight=0.0,
        image_ssim_weight=0.0,
        image_loss_px=None,
        **kwargs,
    ):
        """``mean_fraction``: the share of each batch trained at the deterministic start of a
        residual model (``start`` "mean": the latent zero at the last timestep), so that its
        one-step sample learns the conditional mean of the correction directly; the rest of the
        batch is noised at random timesteps as usual (multi-step and noise sampling keep working).

        ``image_loss_weight``: adds, for those items, the L1 error of the slice the sampler would
        return, ``base + D(z(base) + r) - D(z(base))``, against the true slice (through the frozen
        decoder): the latent MSE alone does not see what the decoder makes of a small correction.
        ``image_ssim_weight``: adds 1 - SSIM of that slice to its L1, within the image loss: the
        decoded correction's fine texture costs SSIM more than it gains in L1. ``image_loss_px``:
        the image loss sees only the central square of that side of each item (the heart, as the
        validator's ``score_px``), where every model over flow gained least; None: all of it."""
        super().__init__(*args, **kwargs)
        self.mean_fraction = float(mean_fraction)
        self.image_loss_weight = float(image_loss_weight)
        self.image_ssim_weight = float(image_ssim_weight)
        self.image_loss_px = None if image_loss_px is None else int(image_loss_px)
        self.ssim_loss = SSIMLoss(spatial_dims=2, data_range=1.0) if self.image_ssim_weight else None
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if self.image_loss_weight and not (prediction == "residual" and self.mean_fraction > 0):
            raise ValueError("image_loss_weight needs prediction 'residual' and a mean_fraction above 0")
        self.latent_inputs = getattr(unwrap(self.network), "latent_inputs", False)  # the denoiser's, fixed
        if self.latent_inputs and prediction != "residual":
            raise ValueError(
                "a denoiser with latent_inputs needs prediction 'residual' (the base's latent is one of them)"
            )
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.noise_scheduler = noise_scheduler
        self.latent_scale = latent_scale
        self.prediction = prediction

    def _iteration(self, engine, batchdata):
        image = as_device_tensor(batchdata["image"], self.device)
        neighbours = as_device_tensor(batchdata["neighbours"], self.device)  # the conditioning
        # over flow, items carry the flow midpoint ("base") and the gap between the neighbours
        base = as_device_tensor(batchdata["base"], self.device) if "base" in batchdata else None
        extra = {"gap_mm": as_device_tensor(batchdata["gap_mm"], self.device)} if "gap_mm" in batchdata else {}
        with torch.no_grad():
            z0 = self.autoencoder.encode(image)[0].float()
            if self.prediction == "residual":  # the correction to the latent of the base slice
                base = neighbours[:, :2].mean(1, keepdim=True) if base is None else base
                z_base = self.autoencoder.encode(base)[0].float()
                z0 = z0 - z_base
            if self.latent_scale.value is None:  # first batch of a fresh run
                self.latent_scale.value = float(1.0 / z0.std().clamp_min(1e-6))
                logger.info("latent scale factor 1/std(target) = %.5f", self.latent_scale.value)
            z0 = z0 * self.latent_scale.value
            if self.latent_inputs:  # in the sampler's units
                extra["latents"] = self.latent_scale.value * conditioning_latents(
                    lambda x: self.autoencoder.encode(x)[0].float(), neighbours, z_base
                )
        noise = torch.randn_like(z0)
        timesteps = torch.randint(0, self.noise_scheduler.num_train_timesteps, (z0.shape[0],), device=self.device)
        z_t = self.noise_scheduler.add_noise(original_samples=z0, noise=noise, timesteps=timesteps)
        at_start = int(round(self.mean_fraction * z0.shape[0])) if self.prediction == "residual" else 0
        if at_start:  # the first items: where a "mean"-start sample begins
            z_t[:at_start] = 0.0
            timesteps[:at_start] = self.noise_scheduler.num_train_timesteps - 1
        self.network.train()
        with self.autocast():
            out = self.inferer(z_t, self.network, timesteps, neighbours, **extra)
            # epsilon: the noise; residual: the clean correction itself (zero at initialisation)
            latent_loss = F.mse_loss(out.float(), z0 if self.prediction == "residual" else noise)
            image_loss = out.new_zeros(())
            if self.image_loss_weight and at_start:
                corrected = self._corrected(out[:at_start], z_base[:at_start], base[:at_start])
                image_loss = self._image_loss(corrected, image[:at_start])
            loss = latent_loss + self.image_loss_weight * image_loss
        self._backward_step(loss, self.network, self.optimizer)
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.network))
        return {"loss": loss.item(), "latent_loss": latent_loss.item(), "image_loss": image_loss.item()}

    def _corrected(self, correction, z_base, base):
        """``base + D(z_base + r) - D(z_base)``, r the predicted (scaled) correction: what the
        one-step sample from the mean start returns (SliceSampler), differentiable in r."""
        decode = self.autoencoder.decode
        with torch.no_grad():
            decoded_base = decode(z_base).float()
        return base + decode(z_base + correction.float() / self.latent_scale.value).float() - decoded_base

    def _image_loss(self, corrected, image):
        corrected, image = central_square(corrected, self.image_loss_px), central_square(image, self.image_loss_px)
        loss = F.l1_loss(corrected, image)
        if self.ssim_loss is not None:
            loss = loss + self.image_ssim_weight * self.ssim_loss(corrected, image.float())
        return loss
