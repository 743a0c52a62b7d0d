"""Training losses of the VAE stage that MONAI does not provide as such: the KL term of the
posterior and a perceptual term that never downloads weights."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def kl_divergence(z_mu, z_sigma):
    dims = list(range(1, z_mu.dim()))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-8) - 1, dim=dims)
    return kl.mean()


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
