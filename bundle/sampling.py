"""DDIM sampling and inversion from one explicit timestep list, and the CaLID slice sampler.

MONAI 1.6's ``DDIMScheduler.step`` derives the previous timestep as ``t - T // steps`` while
``set_timesteps`` lays out another grid (8 steps: 999, 856, ... vs t - 125), and
``reversed_step`` can index past the schedule. Here one list drives both directions: sampling
walks ``timesteps`` down, inversion walks the same pairs up, with alpha_bar(-1) = 1 (clean).
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler

NUM_TRAIN_TIMESTEPS = 1000
# The training noise schedule: scaled-linear betas 0.00085 -> 0.012, as in latent diffusion. Its
# last alpha_bar is 0.0047; with beta_end 0.0195 it is 0.00014, and a few-step DDIM's first clean
# estimate (divided by sqrt(alpha_bar)) amplifies noise-prediction errors 84x instead of 15x
# (measured on the H200 short run: 2-step validation near 7 dB PSNR). It is recorded in the
# weights' model.json ("noise_schedule") so that every sampler uses the schedule the model was
# trained with; weights without that record were trained with this default.
DEFAULT_NOISE_SCHEDULE = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "schedule": "scaled_linear_beta",
    "beta_start": 0.00085,
    "beta_end": 0.012,
}


def make_noise_scheduler(**schedule):
    """A MONAI ``DDPMScheduler`` from a schedule record (missing fields: the default's)."""
    return DDPMScheduler(**{**DEFAULT_NOISE_SCHEDULE, **schedule})


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """Evenly spaced, descending, ending one stride above clean: 1000, 8 -> 999, 874, ..., 124."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    return [round((i + 1) * num_train_timesteps / num_steps) - 1 for i in reversed(range(num_steps))]


class DDIM:
    """Deterministic DDIM (eta = 0) over an explicit timestep list."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_steps: int = 8):
        self.alphas_cumprod = alphas_cumprod.double().cpu()
        self.timesteps = ddim_timesteps(len(alphas_cumprod), num_steps)
        self.pairs = list(zip(self.timesteps, self.timesteps[1:] + [-1]))  # (t, t_prev), noisy -> clean

    def alpha(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def step(self, z_t, eps, t, t_prev):
        """z_t -> z_{t_prev} given the predicted noise at t."""
        a_t, a_prev = self.alpha(t), self.alpha(t_prev)
        x0 = (z_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps

    def inverse_step(self, z_prev, eps, t_prev, t):
        """z_{t_prev} -> z_t, the same update solved the other way (eps evaluated at t)."""
        a_t, a_prev = self.alpha(t), self.alpha(t_prev)
        x0 = (z_prev - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
        return a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps

    def eps_from_x0(self, z_t, x0, t):
        """The noise implied by a clean-latent prediction at t (for x0-predicting networks)."""
        a_t = self.alpha(t)
        return (z_t - a_t**0.5 * x0) / (1 - a_t) ** 0.5

    def sample(self, eps_fn, z_start):
        """Denoise from ``z_start`` at ``timesteps[0]``; ``eps_fn(z, t)`` predicts the noise."""
        z = z_start
        for t, t_prev in self.pairs:
            z = self.step(z, eps_fn(z, t), t, t_prev)
        return z

    def invert(self, eps_fn, z0):
        """Map a clean latent to the noisy latent at ``timesteps[0]`` along the same pairs."""
        z = z0
        for t, t_prev in reversed(self.pairs):
            z = self.inverse_step(z, eps_fn(z, t), t_prev, t)
        return z


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float = 0.5, eps: float = 1e-4) -> torch.Tensor:
    """Spherical interpolation per batch item; falls back to linear when a and b are nearly
    parallel (sin(theta) ~ 0 would divide by zero)."""
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp_min(1e-12)
    theta = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    near = sin.abs() < eps
    safe_sin = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, 1 - alpha, torch.sin((1 - alpha) * theta) / safe_sin)
    wb = torch.where(near, torch.full_like(sin, alpha), torch.sin(alpha * theta) / safe_sin)
    shape = (-1,) + (1,) * (a.dim() - 1)
    return (wa.view(shape) * a.double() + wb.view(shape) * b.double()).to(a.dtype)


PREDICTIONS = ("epsilon", "residual")
DEFAULT_PREDICTION = "residual"  # the shipped formulation: a correction that starts at zero
# where DDIM starts: seeded Gaussian noise (a sample), or the prior's mean, zero (deterministic:
# the model's mean estimate, which scores higher PSNR than a sample)
STARTS = ("noise", "mean")
# a denoiser built with latent_inputs sees, beside z_t, the (scaled) latents of this many slices:
# the two neighbours (over flow: warped half way) and the base (see conditioning_latents)
LATENT_INPUTS = 3
# DDIM cannot take more steps than the schedule has timesteps (a longer schedule records its own)
MAX_STEPS = NUM_TRAIN_TIMESTEPS


def conditioning_latents(encode, neighbours, z_base):
    """The latents of the two neighbours (channels 0 and 1 of the conditioning) and the base's
    latent ``z_base``, stacked as channels: what a denoiser with ``latent_inputs`` takes beside z_t.
    ``encode`` maps (N, 1, ...) slices to latents in the same units as ``z_base``."""
    return torch.cat([encode(neighbours[:, :1]), encode(neighbours[:, 1:2]), z_base], 1)


class SliceSampler:
    """Predict middle slices from their neighbours with a VAE and a conditioned denoiser.

    ``neighbours`` are (N, 2, H, W[, T]) in network intensity scale; returns (N, 1, H, W[, T]).
    ``refine`` (CaLID+) starts from the slerp of the neighbours' DDIM-inverted latents, inverted
    with the same conditioning; otherwise from seeded Gaussian noise.

    ``prediction``: ``"epsilon"`` (the paper: the denoiser predicts the noise of the middle
    slice's latent) or ``"residual"`` (a correction to a base slice: the denoiser predicts the
    clean latent *difference* r = z(s(n)) - z(base), base the mean of the neighbours or, over
    flow, the flow midpoint, and the slice is ``base + D(z(base) + r) - D(z(base))``, so that
    errors the VAE makes on both cancel; a zero-initialised output gives the base exactly).
    """

    def __init__(
        self, autoencoder, denoiser, latent_scale, num_steps=8, alphas_cumprod=None, prediction=DEFAULT_PREDICTION
    ):
        """``alphas_cumprod``: the training schedule's (default: :data:`DEFAULT_NOISE_SCHEDULE`'s)."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.autoencoder = autoencoder
        self.denoiser = denoiser
        self.latent_scale = float(latent_scale)
        self.prediction = prediction
        if alphas_cumprod is None:
            alphas_cumprod = make_noise_scheduler().alphas_cumprod
        self.ddim = DDIM(alphas_cumprod, num_steps)

    def _eps_fn(self, neighbours, gap_mm=None, latents=None):
        extra = {} if gap_mm is None else {"gap_mm": gap_mm}  # for denoisers that embed the gap
        if latents is not None:  # for denoisers that see the conditioning's latents
            extra["latents"] = latents

        def eps(z, t):
            timesteps = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
            out = self.denoiser(z, timesteps, neighbours, **extra)
            return self.ddim.eps_from_x0(z, out, t) if self.prediction == "residual" else out

        return eps

    def encode(self, images):
        return self.autoencoder.encode(images)[0] * self.latent_scale

    def decode(self, latents):
        return self.autoencoder.decode(latents / self.latent_scale)

    def latent_shape(self, neighbours):
        f = self.denoiser.vae_factor
        return (neighbours.shape[0], self.denoiser.latent_channels) + tuple(s // f for s in neighbours.shape[2:])

    @torch.no_grad()
    def latent_blend(self, neighbours, how="linear"):
        """Baselines without the denoiser: decode the linear (or spherical) mean of the
        neighbours' latents."""
        left, right = self.encode(neighbours[:, :1]), self.encode(neighbours[:, 1:2])
        return self.decode(0.5 * (left + right) if how == "linear" else slerp(left, right, 0.5))

    @torch.no_grad()
    def __call__(self, neighbours, refine=False, generator=None, z_start=None, base=None, gap_mm=None):
        """:meth:`sample` without gradients (inference)."""
        return self.sample(neighbours, refine, generator, z_start, base, gap_mm)

    def sample_over_flow(self, conditioning, gap_mm=None):
        """What a residual model over flow returns from the mean start (as shipped), with
        gradients where enabled: ``conditioning`` as :meth:`bundle.networks.CaLIDNetwork.over_flow`
        makes it, its third channel the base (training a flow-correction head through the denoiser)."""
        z_start = conditioning.new_zeros(self.latent_shape(conditioning))
        return self.sample(conditioning, z_start=z_start, base=conditioning[:, 2:3], gap_mm=gap_mm)

    def sample(self, neighbours, refine=False, generator=None, z_start=None, base=None, gap_mm=None):
        """``neighbours``: the conditioning, whose first two channels are the two neighbours
        (over flow: warped half way). ``base`` (N, 1, ...): the slice a residual model corrects
        (default: the neighbours' mean). ``z_start`` (per-item noise) makes results independent
        of batching; without it, noise is drawn from ``generator``. ``gap_mm``: the distance
        between the neighbours, for denoisers that embed it. Differentiable where gradients are
        enabled (training a flow-correction head through a frozen denoiser)."""
        blend, z_base, latents = None, 0.0, None
        if self.prediction == "residual":
            blend = neighbours[:, :2].mean(1, keepdim=True) if base is None else base.to(neighbours.dtype)
            z_base = self.encode(blend)
            if getattr(self.denoiser, "latent_inputs", False):
                latents = conditioning_latents(self.encode, neighbours, z_base)
        eps_fn = self._eps_fn(neighbours, gap_mm, latents)
        if refine:
            left = self.encode(neighbours[:, :1]) - z_base
            right = self.encode(neighbours[:, 1:2]) - z_base
            z_start = slerp(self.ddim.invert(eps_fn, left), self.ddim.invert(eps_fn, right), 0.5)
        elif z_start is None:
            z_start = torch.randn(self.latent_shape(neighbours), generator=generator).to(neighbours.device)
        z0 = self.ddim.sample(eps_fn, z_start.to(neighbours.device, neighbours.dtype))
        if self.prediction == "residual":
            return blend + self.decode(z_base + z0) - self.decode(z_base)
        return self.decode(z0)
