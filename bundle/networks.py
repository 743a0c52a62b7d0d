"""CaLID networks: the VAE, the latent denoiser and its two-part neighbour conditioning.

tau1 encodes the two neighbours [s(n-1), s(n+1)] in image space with a light conv encoder that
downsamples by the VAE factor and ends in a zero-initialised conv (the ``ControlNet``'s
conditioning embedding); tau2 is a ControlNet-style copy of the denoiser's encoder
(time-embedded ResBlocks with self-attention) whose zero-initialised outputs are added into
the denoiser at every scale. All three train together from scratch. With ``latent_inputs`` the
denoiser and tau2 also take, beside the noisy latent, the VAE latents of the two neighbours and
of the base slice (:func:`bundle.sampling.conditioning_latents`).

Sizes come from the configs; :data:`PRESETS` holds the three named sets they start from.
"""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL, BasicUNet, ControlNet, DiffusionModelUNet, PatchDiscriminator
from torch import nn

from .motion import flow_conditioning, warp
from .sampling import DEFAULT_PREDICTION, LATENT_INPUTS, SliceSampler, make_noise_scheduler

PRESETS = {
    # seconds on a CPU: for tests
    "tiny": {
        "vae_channels": [8, 16, 16],
        "vae_res_blocks": 1,
        "latent_channels": 2,
        "vae_norm_groups": 4,
        "unet_channels": [16, 32],
        "unet_attention": [False, True],
        "unet_res_blocks": 1,
        "unet_head_channels": 8,
        "unet_norm_groups": 8,
        "tau1_channels": [8, 8, 16],
        "disc_channels": 8,
        "disc_layers": 2,
        "spatial_size": [32, 32],
        "num_frames": 8,
        "batch_size": 4,
    },
    # about an hour per stage on 2 CPU cores
    "cpu": {
        "vae_channels": [32, 64, 64],
        "vae_res_blocks": 1,
        "latent_channels": 4,
        "vae_norm_groups": 16,
        "unet_channels": [64, 128, 128],
        "unet_attention": [False, False, True],
        "unet_res_blocks": 1,
        "unet_head_channels": 32,
        "unet_norm_groups": 32,
        "tau1_channels": [16, 32, 64],
        "disc_channels": 32,
        "disc_layers": 3,
        "spatial_size": [128, 128],
        "num_frames": 32,
        "batch_size": 8,
    },
    # full size, for a GPU
    "paper": {
        "vae_channels": [64, 128, 256],
        "vae_res_blocks": 2,
        "latent_channels": 4,
        "vae_norm_groups": 32,
        "unet_channels": [128, 256, 512],
        "unet_attention": [False, True, True],
        "unet_res_blocks": 2,
        "unet_head_channels": 64,
        "unet_norm_groups": 32,
        "tau1_channels": [32, 64, 128],
        "disc_channels": 64,
        "disc_layers": 3,
        "spatial_size": [128, 128],
        "num_frames": 32,
        "batch_size": 64,
    },
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def build_autoencoder(spatial_dims, channels, latent_channels, num_res_blocks, norm_num_groups):
    """AutoencoderKL with f = 2 ** (len(channels) - 1) and no attention anywhere."""
    return AutoencoderKL(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=list(channels),
        latent_channels=latent_channels,
        num_res_blocks=num_res_blocks,
        attention_levels=[False] * len(channels),
        norm_num_groups=norm_num_groups,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def build_discriminator(spatial_dims, channels, num_layers):
    return PatchDiscriminator(
        spatial_dims=spatial_dims, num_layers_d=num_layers, channels=channels, in_channels=1, out_channels=1
    )


class ConditionedDenoiser(nn.Module):
    """eps_theta(z_t, t, tau2(tau1(s(n-1), s(n+1)), z_t)): one module, trained jointly.

    ``neighbours`` are image-space (N, 2, H, W[, T]); latents are (N, C, H/f, W/f[, T/f]). The
    shapes are checked, never resized: a mismatch is an error, not a silent interpolation.
    """

    def __init__(
        self,
        spatial_dims,
        latent_channels,
        channels,
        attention_levels,
        num_res_blocks,
        num_head_channels,
        norm_num_groups,
        tau1_channels,
        vae_factor,
        conditioning_channels=2,
        gap_classes=0,
        latent_inputs=False,
    ):
        super().__init__()
        common = dict(
            spatial_dims=spatial_dims,
            # with latent_inputs, z_t comes with the latents of the two neighbours and of the base
            # (LATENT_INPUTS of them): the U-Net sees the slices through the VAE's encoder, not
            # only through tau1's thin one
            in_channels=latent_channels * (1 + LATENT_INPUTS * bool(latent_inputs)),
            channels=list(channels),
            attention_levels=list(attention_levels),
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            # the gap between the neighbours, in whole mm, embedded and added to the timestep's
            num_class_embeds=gap_classes or None,
        )
        self.unet = DiffusionModelUNet(out_channels=latent_channels, **common)
        tau1_downsamplings = len(tau1_channels) - 1
        if 2**tau1_downsamplings != vae_factor:
            raise ValueError(
                f"tau1 must downsample by the VAE factor {vae_factor}: {len(tau1_channels)} channel entries give "
                f"{2 ** tau1_downsamplings}"
            )
        # tau2, with tau1 as its conditioning embedding: the two neighbours (2 channels) or, over
        # flow, the neighbours warped half way, the flow midpoint and its weight (4)
        self.control = ControlNet(
            conditioning_embedding_in_channels=conditioning_channels,
            conditioning_embedding_num_channels=list(tau1_channels),
            **common,
        )
        self.vae_factor = vae_factor
        self.latent_channels = latent_channels
        self.conditioning_channels = conditioning_channels
        self.gap_classes = gap_classes
        self.latent_inputs = bool(latent_inputs)
        if gap_classes:  # a warm start or an untrained model ignores the gap until it learns it
            for embedding in (self.unet.class_embedding, self.control.class_embedding):
                torch.nn.init.zeros_(embedding.weight)

    @property
    def tau1(self):
        return self.control.controlnet_cond_embedding

    def gap_class(self, gap_mm, batch, device):
        """The gap embedding's class of each item: the gap in whole mm, within the table."""
        if not self.gap_classes:
            return None
        gap = torch.as_tensor(0.0 if gap_mm is None else gap_mm, dtype=torch.float32, device=device)
        return gap.round().clamp(0, self.gap_classes - 1).long().expand(batch)

    def forward(self, z_t, timesteps, neighbours, gap_mm=None, latents=None):
        """``latents``: (N, LATENT_INPUTS * C, ...) from :func:`bundle.sampling.conditioning_latents`,
        for a denoiser built with ``latent_inputs``."""
        expected = tuple(s * self.vae_factor for s in z_t.shape[2:])
        if tuple(neighbours.shape[2:]) != expected or neighbours.shape[1] != self.conditioning_channels:
            raise ValueError(
                f"conditioning must be (N, {self.conditioning_channels}, {expected}) for latents {tuple(z_t.shape)}, "
                f"got {tuple(neighbours.shape)}"
            )
        if self.latent_inputs:
            want = (z_t.shape[0], LATENT_INPUTS * self.latent_channels) + tuple(z_t.shape[2:])
            if latents is None or tuple(latents.shape) != want:
                got = None if latents is None else tuple(latents.shape)
                raise ValueError(f"this denoiser takes the conditioning's latents {want} beside z_t, got {got}")
            x = torch.cat([z_t, latents.to(z_t.dtype)], 1)
        else:
            x = z_t
        labels = self.gap_class(gap_mm, z_t.shape[0], z_t.device)
        down, mid = self.control(
            x=x, timesteps=timesteps, controlnet_cond=neighbours.to(z_t.dtype), class_labels=labels
        )
        return self.unet(
            x=x,
            timesteps=timesteps,
            class_labels=labels,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )


def build_denoiser(spatial_dims, net: dict):
    return ConditionedDenoiser(
        spatial_dims=spatial_dims,
        latent_channels=net["latent_channels"],
        channels=net["unet_channels"],
        attention_levels=net["unet_attention"],
        num_res_blocks=net["unet_res_blocks"],
        num_head_channels=net["unet_head_channels"],
        norm_num_groups=net["unet_norm_groups"],
        tau1_channels=net["tau1_channels"],
        vae_factor=2 ** (len(net["vae_channels"]) - 1),
        conditioning_channels=net.get("conditioning_channels", 2),
        gap_classes=net.get("gap_classes", 0),
        latent_inputs=net.get("latent_inputs", False),
    )


def build_networks(spatial_dims, net: dict):
    """The VAE and the conditioned denoiser described by a preset-style ``net`` dict."""
    autoencoder = build_autoencoder(
        spatial_dims, net["vae_channels"], net["latent_channels"], net["vae_res_blocks"], net["vae_norm_groups"]
    )
    return autoencoder, build_denoiser(spatial_dims, net)


FLOW_CORRECTION_FEATURES = [16, 32, 48, 64, 64, 16]  # BasicUNet's six widths: 0.4 M parameters
FLOW_CORRECTION_GAP_MM = 40.0  # the head sees gap / 40 mm, about [0, 1] over the trained gaps


def gap_plane(gap_mm, conditioning):
    """The gap (mm; a number, one per item, or None for 0) as a constant channel (N, 1, H, W)
    beside ``conditioning``, scaled by :data:`FLOW_CORRECTION_GAP_MM`: how pixel-space networks
    over flow see the distance between the neighbours."""
    n, _, h, w = conditioning.shape
    gap = torch.as_tensor(0.0 if gap_mm is None else gap_mm, dtype=conditioning.dtype, device=conditioning.device)
    return (gap / FLOW_CORRECTION_GAP_MM).reshape(-1, 1, 1, 1).expand(n, 1, h, w)


class FlowCorrection(nn.Module):
    """A learned correction of the flow midpoint that moves and blends pixels but never paints
    them, as video frame interpolation networks refine a flow: from the conditioning over flow
    (N, 4, H, W: the neighbours warped half way, the midpoint, its weight) and the gap, a U-Net
    predicts a displacement update (pixels) for each warped neighbour and softmax weights over
    the two re-warped neighbours and the midpoint. Returns the same four channels with the
    neighbours re-warped and the midpoint replaced by that blend: what the denoiser corrects.
    The output convolution starts at zero with the midpoint's weight near 1 (logit 6 against
    0), so an untrained head returns the flow midpoint up to about 5e-3 of the neighbours."""

    def __init__(self, features=FLOW_CORRECTION_FEATURES, start_logit=6.0):
        super().__init__()
        self.unet = BasicUNet(spatial_dims=2, in_channels=5, out_channels=7, features=tuple(features))
        nn.init.zeros_(self.unet.final_conv.weight)
        with torch.no_grad():
            self.unet.final_conv.bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, start_logit]))

    def forward(self, conditioning, gap_mm=None):
        out = self.unet(torch.cat([conditioning, gap_plane(gap_mm, conditioning)], 1))
        left, right = warp(conditioning[:, 0:1], out[:, 0:2]), warp(conditioning[:, 1:2], out[:, 2:4])
        candidates = torch.cat([left, right, conditioning[:, 2:3]], 1)
        midpoint = (candidates * torch.softmax(out[:, 4:7], 1)).sum(1, keepdim=True)
        return torch.cat([left, right, midpoint, conditioning[:, 3:4]], 1)


class CaLIDNetwork(nn.Module):
    """The VAE, the conditioned denoiser and an optional flow-correction head as one module: one
    state dict (``models/model.pt``, keys ``autoencoder.*``, ``denoiser.*``, ``flow_correction.*``)
    beside ``model.json`` (preset, sizes, latent scale, prediction, noise schedule). ``forward``
    predicts middle slices from neighbours (N, 2, H, W[, T])."""

    def __init__(self, spatial_dims, net: dict, latent_scale=1.0, prediction=DEFAULT_PREDICTION, noise_schedule=None):

        super().__init__()
        self.autoencoder, self.denoiser = build_networks(spatial_dims, net)
        # a learned correction of the flow midpoint, applied before the denoiser (models over flow)
        self.flow_correction = FlowCorrection(net["flow_correction"]) if net.get("flow_correction") else None
        self.spatial_dims, self.net = int(spatial_dims), net
        self.latent_scale, self.prediction = float(latent_scale), prediction
        self.noise_schedule = dict(noise_schedule or {})  # the training schedule; {}: the default
        self.alphas_cumprod = make_noise_scheduler(**self.noise_schedule).alphas_cumprod

    @classmethod
    def from_info(cls, info):
        """From a :class:`bundle.weights.ModelInfo` (what ``model.json`` records)."""
        return cls(info.spatial_dims, info.net, info.latent_scale, info.prediction, info.noise_schedule)

    def over_flow(self, left, right, gap_mm=None):
        """The conditioning of a model over flow for neighbours (N, 1, H, W): the neighbours warped
        half way, the flow midpoint (the base) and its weight; with a flow-correction head, the
        head's re-warped neighbours and corrected midpoint instead."""
        conditioning = flow_conditioning(left, right)
        if self.flow_correction is not None:
            conditioning = self.flow_correction(conditioning, gap_mm)
        return conditioning

    def sampler(self, num_steps=1):
        return SliceSampler(
            self.autoencoder,
            self.denoiser,
            self.latent_scale,
            num_steps,
            alphas_cumprod=self.alphas_cumprod,
            prediction=self.prediction,
        )

    def forward(self, neighbours, num_steps=1, refine=False, z_start=None, generator=None, base=None, gap_mm=None):
        return self.sampler(num_steps)(
            neighbours, refine=refine, generator=generator, z_start=z_start, base=base, gap_mm=gap_mm
        )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def encode_mean(autoencoder, images):
    """Deterministic latent: the posterior mean."""
    z_mu, _ = autoencoder.encode(images)
    return z_mu
