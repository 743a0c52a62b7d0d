"""Ignite training engines (through MONAI's ``SupervisedTrainer``) for the two CaLID stages,
and the handlers they share: EMA, warm-up, resumable checkpoints, validation, CSV log.

Stage 1 trains the VAE (L1 + KL + PatchGAN + perceptual); stage 2 freezes it and trains the
conditioned latent denoiser (epsilon-prediction MSE). Both run AMP on CUDA only (bf16 where
supported, else fp16 with a gradient scaler), clip gradients and keep an EMA of the weights.
"""

from __future__ import annotations

import csv
import logging
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.losses import PatchAdversarialLoss
from torch.optim.swa_utils import AveragedModel

from .io import atomic_write
from .metrics import psnr, ssim

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


def unwrap(module):
    """The bare network inside DistributedDataParallel (or itself)."""
    return getattr(module, "module", module)


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

    @classmethod
    def from_weights(cls, weights_path=None):
        """The scale saved beside ``weights_path`` (a warm start keeps its latent units), else unset."""
        if weights_path is None:
            return cls()
        import json

        return cls(json.loads(Path(weights_path).with_suffix(".json").read_text())["latent_scale"])

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def amp_context(device, enabled=True):
    """Autocast on CUDA (bf16 where supported, else fp16); a no-op elsewhere."""
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def needs_grad_scaler(device, amp=True):
    device = torch.device(device)
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


def as_device_tensor(x, device):
    """Plain float tensor on ``device`` (MONAI transforms hand out MetaTensors)."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.to(device).float()


def kl_divergence(z_mu, z_sigma):
    dims = list(range(1, z_mu.dim()))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-8) - 1, dim=dims)
    return kl.mean()


# ----------------------------------------------------------------------------- perceptual loss


class PerceptualTerm(torch.nn.Module):
    """LPIPS (AlexNet) when its ImageNet backbone weights are available locally; otherwise the
    configured fallback (``"ssim"``: 1 - SSIM, or ``"none"``). Never downloads: the backbone is
    built with random weights and loaded from the local file. 2D+T volumes are scored per frame."""

    def __init__(self, weights_path=None, fallback="ssim"):
        from monai.losses import SSIMLoss

        super().__init__()
        self.kind = fallback
        self.lpips = None
        self.ssim_loss = SSIMLoss(spatial_dims=2, data_range=1.0)
        from .metrics import alexnet_weights_path, load_lpips

        path = alexnet_weights_path(weights_path)
        if path is not None:
            self.lpips = load_lpips(path)
            self.kind = "lpips"
            logger.info("perceptual loss: LPIPS (AlexNet) with backbone weights from %s", path)
        elif fallback == "ssim":
            logger.warning(
                "perceptual loss: no local AlexNet weights (looked at %s and the torch hub cache); "
                "using 1 - SSIM instead (config id 'perceptual_fallback')",
                weights_path,
            )
        elif fallback == "none":
            logger.warning("perceptual loss: no local AlexNet weights; perceptual term disabled")
        else:
            raise ValueError(f"unknown perceptual fallback {fallback!r}: use 'ssim' or 'none'")

    def forward(self, pred, target):
        from .metrics import as_frames

        pred, target = as_frames(pred), as_frames(target)
        if self.kind == "lpips":
            return self.lpips(pred.repeat(1, 3, 1, 1), target.repeat(1, 3, 1, 1), normalize=True).mean()
        if self.kind == "ssim":
            return self.ssim_loss(pred.float(), target.float())
        return pred.new_zeros(())


# ----------------------------------------------------------------------------- trainers


class _CaLIDTrainer(SupervisedTrainer):
    """Shared parts: device/AMP handling, clipping, EMA update, scalar outputs."""

    def __init__(self, *args, ema=None, grad_clip=1.0, amp=True, **kwargs):
        device = torch.device(kwargs.get("device", "cpu"))
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("loss_function", None)  # each stage computes its own losses
        super().__init__(*args, amp=False, **kwargs)  # AMP is handled here, per device
        self.device = device
        self.use_amp = amp and device.type == "cuda"
        self.grad_scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(device, amp) else None
        self.ema = ema
        self.grad_clip = grad_clip

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
        with amp_context(self.device, self.use_amp):
            recon, z_mu, z_sigma = self.network(images)
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
            with amp_context(self.device, self.use_amp):
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
    random timestep, given the noisy latent and the two neighbours (image space)."""

    def __init__(self, *args, autoencoder, noise_scheduler, latent_scale: LatentScale, prediction="epsilon", **kwargs):
        from .sampling import PREDICTIONS

        super().__init__(*args, **kwargs)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.noise_scheduler = noise_scheduler
        self.latent_scale = latent_scale
        self.prediction = prediction

    def _iteration(self, engine, batchdata):
        image = as_device_tensor(batchdata["image"], self.device)
        neighbours = as_device_tensor(batchdata["neighbours"], self.device)
        with torch.no_grad():
            z0 = self.autoencoder.encode(image)[0].float()
            if self.prediction == "residual":  # the correction to the latent of the linear blend
                z0 = z0 - self.autoencoder.encode(neighbours.mean(1, keepdim=True))[0].float()
            if self.latent_scale.value is None:  # first batch of a fresh run
                self.latent_scale.value = float(1.0 / z0.std().clamp_min(1e-6))
                logger.info("latent scale factor 1/std(target) = %.5f", self.latent_scale.value)
            z0 = z0 * self.latent_scale.value
        noise = torch.randn_like(z0)
        timesteps = torch.randint(0, self.noise_scheduler.num_train_timesteps, (z0.shape[0],), device=self.device)
        z_t = self.noise_scheduler.add_noise(original_samples=z0, noise=noise, timesteps=timesteps)
        self.network.train()
        with amp_context(self.device, self.use_amp):
            out = self.network(z_t, timesteps, neighbours)
            # epsilon: the noise; residual: the clean correction itself (zero at initialisation)
            loss = F.mse_loss(out.float(), z0 if self.prediction == "residual" else noise)
        self._backward_step(loss, self.network, self.optimizer)
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.network))
        return {"loss": loss.item()}


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d+)\.pt$")


def latest_checkpoint(checkpoint_dir):
    """The checkpoint with the highest iteration in ``checkpoint_dir``, or None."""
    folder = Path(checkpoint_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint_*.pt") if (m := CHECKPOINT_PATTERN.search(p.name))]
    return max(found)[1] if found else None


def attach_checkpointing(trainer, checkpoint_dir, objects: dict, every_iterations=50, n_saved=2):
    """Save ``objects`` (models, EMA, optimisers, schedulers, engine, RNG...) every N
    iterations and at the end, atomically, keeping the last ``n_saved``."""
    from ignite.handlers import Checkpoint, DiskSaver

    saver = Checkpoint(
        objects,
        DiskSaver(str(checkpoint_dir), require_empty=False, atomic=True),
        filename_prefix="",
        filename_pattern="checkpoint_{global_step}.pt",
        global_step_transform=lambda engine, _: engine.state.iteration,
        n_saved=n_saved,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=max(1, int(every_iterations))), saver)
    trainer.add_event_handler(Events.COMPLETED, saver)
    return saver


def resume_latest(checkpoint_dir, objects: dict, max_epochs=None):
    """Load the newest checkpoint into ``objects`` if there is one (before ``trainer.run()``).
    ``max_epochs`` (the run's setting) replaces the one saved in the checkpoint, so that a
    resumed run can be given more, or fewer, epochs."""
    from ignite.handlers import Checkpoint

    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        logger.info("no checkpoint in %s: starting from scratch", checkpoint_dir)
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    Checkpoint.load_objects(to_load=objects, checkpoint=state)
    if max_epochs is not None and "trainer" in objects:
        objects["trainer"].state.max_epochs = int(max_epochs)
    logger.info("resumed from %s", path)
    return path


# ----------------------------------------------------------------------------- logging and validation


class CSVLogger:
    """Append the trainer's scalar outputs to ``path`` every ``every`` iterations."""

    def __init__(self, path, every=10):
        self.path = Path(path)
        self.every = max(1, int(every))

    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)

    def __call__(self, engine):
        row = {"iteration": engine.state.iteration, "epoch": engine.state.epoch}
        row.update({k: v for k, v in engine.state.output.items() if isinstance(v, (int, float))})
        row["lr"] = engine.optimizer.param_groups[0]["lr"] if hasattr(engine, "optimizer") else None
        _append_csv(self.path, row)


def _append_csv(path, row):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


class InterpolationValidator:
    """Every ``every_epochs`` epochs, predict the middle slice of fixed validation triplets and
    report PSNR/SSIM against linear interpolation (and the gain over it) in
    ``engine.state.metrics``, the log and ``validation.csv``. The predictor is a callable
    ``neighbours, middle -> prediction`` (network scale). Keeps the weights of the best gain."""

    def __init__(self, dataset, predictor, output_dir, every_epochs=1, batch_size=8, save_best=None, device="cpu"):
        self.dataset = dataset
        self.predictor = predictor
        self.output_dir = Path(output_dir)
        self.every = max(1, int(every_epochs))
        self.batch_size = batch_size
        self.save_best = save_best  # callable(path) writing the weights worth keeping
        self.device = torch.device(device)
        self.best_gain = -float("inf")

    def state_dict(self):
        return {"best_gain": self.best_gain}

    def load_state_dict(self, state):
        self.best_gain = state["best_gain"]

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
        # score the starting weights too (linear interpolation for a fresh residual model, the
        # warm-start weights otherwise), so that "best" can never be worse than the start
        engine.add_event_handler(Events.STARTED, lambda e: self(e) if e.state.iteration == 0 else None)

    @torch.no_grad()
    def evaluate(self):
        scores = {"psnr": [], "ssim": [], "psnr_linear": [], "ssim_linear": []}
        for start in range(0, len(self.dataset), self.batch_size):
            items = [self.dataset[i] for i in range(start, min(start + self.batch_size, len(self.dataset)))]
            middle = as_device_tensor(torch.stack([it["image"] for it in items]), self.device)
            neighbours = as_device_tensor(torch.stack([it["neighbours"] for it in items]), self.device)
            pred = self.predictor(neighbours, middle).float().clamp(-0.5, 1.5)
            linear = neighbours.mean(1, keepdim=True)
            scores["psnr"].append(psnr(pred, middle))
            scores["ssim"].append(ssim(pred, middle))
            scores["psnr_linear"].append(psnr(linear, middle))
            scores["ssim_linear"].append(ssim(linear, middle))
        result = {f"val_{k}": float(torch.cat(v).mean()) for k, v in scores.items()}
        result["val_gain_db"] = result["val_psnr"] - result["val_psnr_linear"]
        result["val_gain_ssim"] = result["val_ssim"] - result["val_ssim_linear"]
        return result

    def __call__(self, engine):
        if len(self.dataset) == 0:
            logger.warning("validation skipped: no validation studies (set val_studies or val_fraction)")
            return
        result = self.evaluate()
        engine.state.metrics.update(result)
        logger.info(
            "validation epoch %d: PSNR %.2f dB (linear %.2f, gain %+.2f), SSIM %.4f (linear %.4f)",
            engine.state.epoch,
            result["val_psnr"],
            result["val_psnr_linear"],
            result["val_gain_db"],
            result["val_ssim"],
            result["val_ssim_linear"],
        )
        _append_csv(
            self.output_dir / "validation.csv",
            {"epoch": engine.state.epoch, "iteration": engine.state.iteration, **result},
        )
        if self.save_best is not None and result["val_gain_db"] > self.best_gain:
            self.best_gain = result["val_gain_db"]
            self.save_best(self.output_dir / "best.pt")


def reconstruction_predictor(autoencoder):
    """Stage 1 validation: the VAE's reconstruction of the true middle slice (its ceiling)."""

    def predict(neighbours, middle):
        autoencoder.eval()
        return autoencoder.reconstruct(middle)

    return predict


def sampler_predictor(
    autoencoder, ema, latent_scale: LatentScale, num_steps=8, seed=0, prediction="epsilon", noise_scheduler=None
):
    """Stage 2 validation: DDIM from seeded noise with the EMA denoiser, neighbours only, on the
    training noise schedule (``noise_scheduler``; None: the default one)."""
    from .sampling import SliceSampler

    def predict(neighbours, middle):
        generator = torch.Generator().manual_seed(seed)
        denoiser = ema.module.eval()
        scale = latent_scale.value if latent_scale.value is not None else 1.0
        alphas_cumprod = None if noise_scheduler is None else noise_scheduler.alphas_cumprod
        sampler = SliceSampler(
            autoencoder.eval(),
            denoiser,
            scale,
            num_steps=num_steps,
            alphas_cumprod=alphas_cumprod,
            prediction=prediction,
        )
        return sampler(neighbours, generator=generator)

    return predict


class StopOnNan:
    """Ignite's ``TerminateOnNan`` on the loss, as a handler with ``attach``."""

    def attach(self, engine):
        from ignite.handlers import TerminateOnNan

        engine.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan(lambda output: output["loss"]))


class ProgressBar:
    """An Ignite progress bar showing the running loss."""

    def attach(self, engine):
        from ignite.handlers import ProgressBar as IgniteBar

        IgniteBar(persist=True).attach(engine, output_transform=lambda output: {"loss": output["loss"]})


def load_frozen(network, path, device="cpu"):
    """Load trained weights (a plain state dict) into ``network`` and freeze it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained weights at {path}: run the autoencoder stage first (configs/train_autoencoder.json) "
            f"or point autoencoder_dir at its output folder"
        )
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return network.to(device).eval().requires_grad_(False)


def best_or_last(output_dir):
    """The diffusion weights to export: ``best.pt`` (best validation gain) if validation ran, else ``diffusion.pt``."""
    best = Path(output_dir) / "best.pt"
    return best if best.is_file() else Path(output_dir) / "diffusion.pt"


def init_weights(network, path=None):
    """Warm start: load a plain state dict (fp16 shipped weights too) into ``network``; no-op for None."""
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if any(k.startswith("denoiser.") for k in state):  # an exported model.pt: take its denoiser
            state = {k[len("denoiser.") :]: v for k, v in state.items() if k.startswith("denoiser.")}
        network.load_state_dict(state)
    return network


def save_weights(module, path, extra: dict | None = None):
    """A plain state dict (``torch.load(weights_only=True)`` loads it) plus a JSON sidecar."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(module).state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    if extra is not None:  # objects such as LatentScale are written by their current value
        text = json.dumps(extra, indent=4, default=lambda o: getattr(o, "value", str(o)))
        atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    return path
