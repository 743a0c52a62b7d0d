"""Image-quality metrics on network-scale intensities (the study's robust [0, 1] range)."""

from __future__ import annotations

import torch
from monai.metrics import PSNRMetric, SSIMMetric


def as_frames(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W[, T]) -> (N * T, C, H, W): 2D+T volumes are scored frame by frame."""
    if images.dim() == 5:
        n, c, h, w, t = images.shape
        return images.permute(0, 4, 1, 2, 3).reshape(n * t, c, h, w)
    return images


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR per item (dB); 2D+T items are averaged over their frames."""
    n = pred.shape[0]
    values = PSNRMetric(max_val=data_range, reduction="none")(as_frames(pred).float(), as_frames(target).float())
    return values.view(n, -1).mean(1)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM per item (11-pixel Gaussian window); 2D+T items are averaged over their frames."""
    n = pred.shape[0]
    metric = SSIMMetric(spatial_dims=2, data_range=data_range, reduction="none")
    values = metric(as_frames(pred).float(), as_frames(target).float())
    return values.view(n, -1).mean(1)
