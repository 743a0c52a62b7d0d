"""Motion-compensated midpoints: dense optical flow between neighbouring slices, batched, in torch.

Neighbouring short-axis slices show the same heart displaced and deformed by a few millimetres
(the wall thickens, the cavity narrows toward the apex). Averaging them (linear interpolation)
doubles every edge; following the motion half way from each side and blending does not.

The flow is TV-L1 (an L1 data term, total-variation smoothness), solved by the primal-dual
scheme of Zach, Pock and Bischof (2007) with repeated warping (Wedel et al. 2009), coarse to
fine, for a whole batch of pairs at once with a fixed number of iterations: deterministic, and
independent of the batch size up to float rounding. It is estimated *symmetrically* on the grid half way between the
neighbours, ``a(x - u/2) ~ b(x + u/2)``: one flow per gap instead of two, the midpoint needs no
approximation of where the flow is evaluated, and swapping the neighbours gives ``-u`` and
exactly the same midpoint. The data term sees each slice normalised on its own (1st-99th
percentile) plus a local-contrast copy: neighbouring slices differ in brightness (coil
sensitivity, windowing) and the flow should follow the anatomy. Where the two half-way warps
still disagree (structures that appear or vanish between slices: base, apex, papillary
muscles), the midpoint falls back smoothly to the linear blend.

How the settings were chosen (leave-one-out on the training studies SCD0000101/0201/0301,
heart region): docs/README.md, "Motion-compensated midpoints (flow)".

Flow convention: (N, 2, H, W) in pixels, channel 0 along the first image axis, channel 1 along
the second; ``warp(img, flow)(x) = img(x + flow(x))``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class FlowSettings:
    attachment: float = 12.0  # lambda: weight of the data term against smoothness
    tightness: float = 0.3  # theta: coupling of the flow and its total-variation-denoised copy
    warps: int = 3  # re-linearisations of the data term per pyramid level
    iterations: int = 8  # primal-dual iterations per warp
    min_size: int = 16  # the coarsest pyramid level's smaller side (pixels)
    max_levels: int = 5
    # pyramid levels left out at the fine end: 1 solves at half resolution and upsamples the
    # flow (the heart's motion is smooth at that scale; the images are still warped at full size)
    skip_finest: int = 1
    structure_sigma: float = 10.0  # pixels: the window of the local-contrast copy in the data term
    # normalised intensity difference of the two half-way warps at which the motion-compensated
    # value keeps exp(-1) of its weight against the linear blend; None: no fallback
    consistency: float | None = 0.2

    def __post_init__(self):
        for name in ("attachment", "tightness", "structure_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warps", "iterations", "min_size", "max_levels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if int(self.skip_finest) < 0:
            raise ValueError(f"skip_finest must be 0 or more, got {self.skip_finest}")
        if self.consistency is not None and not self.consistency > 0:
            raise ValueError(f"consistency must be positive or None, got {self.consistency}")


def normalise_slices(images: torch.Tensor, lower=0.01, upper=0.99) -> torch.Tensor:
    """Each slice of (N, 1, H, W) mapped from its own [lower, upper] quantiles to [0, 1], clipped;
    a constant slice becomes 0."""
    flat = images.flatten(1).float().sort(dim=1).values  # sort: torch.quantile refuses large batches
    last = flat.shape[1] - 1
    lo = flat[:, round(lower * last)].view(-1, 1, 1, 1)
    hi = flat[:, round(upper * last)].view(-1, 1, 1, 1)
    span = hi - lo
    return ((images.float() - lo) / span.clamp_min(1e-12)).clamp(0, 1) * (span > 1e-12)


def _gaussian_blur(images, sigma):
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def flow_features(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """What the data term compares: half the per-slice normalised image, half its local contrast
    (minus the local mean, over the local standard deviation, scaled to a similar range)."""
    g = normalise_slices(images)
    if min(g.shape[-2:]) < 2:
        return g
    sigma = min(sigma, max(g.shape[-2:]) / 6)  # tiny images: a window that fits
    mean = _gaussian_blur(g, sigma)
    std = (_gaussian_blur(g * g, sigma) - mean * mean).clamp_min(0).sqrt()
    return 0.5 * g + 0.125 * (g - mean) / (std + 0.05)


def _base_grid(h, w, device, dtype):
    ys = torch.arange(h, device=device, dtype=dtype)
    xs = torch.arange(w, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, H, W)


def warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp, ``out(x) = images(x + flow(x))``: bilinear, edges extended.
    images (N, C, H, W), flow (N, 2, H, W) in pixels."""
    _, _, h, w = images.shape
    pos = _base_grid(h, w, flow.device, flow.dtype) + flow
    # grid_sample wants (x, y) = (second axis, first axis) in [-1, 1] (align_corners=True)
    gx = pos[:, 1] * (2.0 / max(w - 1, 1)) - 1.0
    gy = pos[:, 0] * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def _gradient(u):
    """Forward differences, zero across the far border, of (N, C, H, W): (d/dy, d/dx)."""
    gy = F.pad(u[:, :, 1:] - u[:, :, :-1], (0, 0, 0, 1))
    gx = F.pad(u[..., 1:] - u[..., :-1], (0, 1))
    return gy, gx


def _divergence(py, px):
    """The negative adjoint of :func:`_gradient` (backward differences)."""
    dy = F.pad(py[:, :, :-1], (0, 0, 0, 1)) - F.pad(py[:, :, :-1], (0, 0, 1, 0))
    dx = F.pad(px[..., :-1], (0, 1)) - F.pad(px[..., :-1], (1, 0))
    return dy + dx


def _central_gradient(img):
    """Central differences of (N, 1, H, W), one-sided at the borders: (N, 2, H, W)."""
    p = F.pad(img, (1, 1, 1, 1), mode="replicate")
    gy = 0.5 * (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1])
    gx = 0.5 * (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2])
    return torch.cat([gy, gx], 1)


def _refine(a, b, flow, settings: FlowSettings):
    """TV-L1 refinement of the symmetric flow (N, 2, H, W) at one pyramid level."""
    lt = settings.attachment * settings.tightness
    ratio = 0.25 / settings.tightness  # dual step tau = 1/4 (the usual choice in 2D) over theta
    py = torch.zeros_like(flow)  # dual variables of both flow components, one per axis
    px = torch.zeros_like(flow)
    for _ in range(settings.warps):
        # linearise a(x - u/2) - b(x + u/2) around the current flow: residual = rho_0 + grad . u
        wa, wb = warp(a, -0.5 * flow), warp(b, 0.5 * flow)
        grad = 0.5 * (_central_gradient(wa) + _central_gradient(wb))
        rho_0 = wb - wa - (grad * flow).sum(1, keepdim=True)
        grad_sq = (grad * grad).sum(1, keepdim=True) + 1e-12
        for _ in range(settings.iterations):
            rho = rho_0 + (grad * flow).sum(1, keepdim=True)
            # pointwise minimiser of the linearised L1 data term plus the quadratic coupling
            v = flow - (rho / grad_sq).clamp(-lt, lt) * grad
            # total-variation denoising of v (Chambolle's projection), each component on its own
            flow = v + settings.tightness * _divergence(py, px)
            gy, gx = _gradient(flow)
            scale = 1.0 + ratio * torch.sqrt(gy * gy + gx * gx)
            py = (py + ratio * gy) / scale
            px = (px + ratio * gx) / scale
    return flow


def _pyramid(images, settings: FlowSettings):
    levels = [images]
    while len(levels) < settings.max_levels and min(levels[-1].shape[-2:]) // 2 >= settings.min_size:
        levels.append(F.avg_pool2d(levels[-1], 2, ceil_mode=True))  # area average: a mild anti-alias
    return levels[::-1]


def midpoint_flow(a: torch.Tensor, b: torch.Tensor, settings: FlowSettings = FlowSettings()) -> torch.Tensor:
    """The symmetric flow u (N, 2, H, W) on the grid half way between ``a`` and ``b`` (N, 1, H, W),
    with ``warp(a, -u / 2) ~ warp(b, u / 2)``; float32, coarse to fine."""
    fa = flow_features(a.float(), settings.structure_sigma)
    fb = flow_features(b.float(), settings.structure_sigma)
    pa, pb = _pyramid(fa, settings), _pyramid(fb, settings)
    solved = max(1, len(pa) - settings.skip_finest)
    flow = torch.zeros((a.shape[0], 2, *pa[0].shape[2:]), device=a.device, dtype=torch.float32)
    for la, lb in zip(pa[:solved], pb[:solved]):
        flow = _resize_flow(flow, la.shape[2:])
        flow = _refine(la, lb, flow, settings)
    return _resize_flow(flow, a.shape[2:])


def _resize_flow(flow, size):
    """A flow field on another grid of the same image, in that grid's pixels."""
    if tuple(flow.shape[2:]) == tuple(size):
        return flow
    scale = torch.tensor([size[0] / flow.shape[2], size[1] / flow.shape[3]], device=flow.device, dtype=flow.dtype)
    return F.interpolate(flow, size=tuple(size), mode="bilinear", align_corners=True) * scale.view(1, 2, 1, 1)


def half_way(a: torch.Tensor, b: torch.Tensor, settings: FlowSettings = FlowSettings()):
    """The two neighbours ``a``, ``b`` (N, 1, H, W) warped half way along their flow, the
    motion-compensated midpoint in their intensities, and the weight (N, 1, H, W) in [0, 1] it
    gives the motion-compensated value against the linear blend (1 everywhere without a
    consistency fallback). Returns (warped a, warped b, midpoint, weight)."""
    a32, b32 = a.float(), b.float()
    flow = midpoint_flow(a32, b32, settings)
    wa, wb = warp(a32, -0.5 * flow), warp(b32, 0.5 * flow)
    moved = 0.5 * (wa + wb)
    weight = torch.ones_like(moved)
    if settings.consistency is not None:
        # where the two half-way warps disagree the flow cannot explain the change: blend linearly
        disagreement = (normalise_slices(wa) - normalise_slices(wb)).abs()
        weight = torch.exp(-((disagreement / settings.consistency) ** 2))
    linear = 0.5 * (a32 + b32)
    out = linear + weight * (moved - linear)
    # identical neighbours: that slice, exactly (bilinear sampling at zero flow rounds slightly)
    same = (a32 == b32).flatten(1).all(1).view(-1, 1, 1, 1)
    return wa, wb, torch.where(same, a32, out), weight


def flow_midpoint(a: torch.Tensor, b: torch.Tensor, settings: FlowSettings = FlowSettings()):
    """The motion-compensated slice half way between ``a`` and ``b`` (N, 1, H, W) and its weight
    against the linear blend (:func:`half_way`)."""
    _, _, midpoint, weight = half_way(a, b, settings)
    return midpoint, weight


def flow_conditioning(a: torch.Tensor, b: torch.Tensor, settings: FlowSettings = FlowSettings()) -> torch.Tensor:
    """What a learned model over flow sees of two neighbours (N, 1, H, W): (N, 4, H, W) = the
    neighbours warped half way (aligned with the midpoint), the flow midpoint, its weight."""
    return torch.cat(half_way(a, b, settings), 1)


# float32 planes of one pair's size alive at once during the solve: peak memory grew by about
# 16 MB per 256x256 pair between batches of 4 and 64 pairs (CPU)
PLANES_PER_PAIR = 64


def pairs_per_chunk(x, y, memory_budget_mb) -> int:
    """How many X x Y pairs one flow solve may take at once within ``memory_budget_mb``."""
    return max(1, int(memory_budget_mb * 2**20 // (PLANES_PER_PAIR * 4 * x * y)))


class FlowMidpoints:
    """Midpoint predictor (the protocol of :mod:`bundle.upsample`): the motion-compensated
    midpoint of every (gap, phase) pair of a bisection level, in batched chunks that keep the
    solver's working memory within ``memory_budget_mb``. Training-free and deterministic."""

    name = "flow"
    needs_all_phases = False

    def __init__(self, settings: FlowSettings = FlowSettings(), device="cpu", memory_budget_mb=256, progress=None):
        if not memory_budget_mb or memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
        self.settings = settings
        self.device = torch.device(device)
        self.memory_budget_mb = memory_budget_mb
        self.progress = progress
        self.generated = 0

    @torch.inference_mode()
    def __call__(self, left, right, gap_mm=None, phase_offset=0):
        gaps, phases, x, y = left.shape
        a, b = left.reshape(-1, 1, x, y), right.reshape(-1, 1, x, y)
        out = torch.empty(a.shape, dtype=torch.float32)
        chunk = pairs_per_chunk(x, y, self.memory_budget_mb)
        for start in range(0, a.shape[0], chunk):
            stop = min(start + chunk, a.shape[0])
            a_dev = a[start:stop].to(self.device, torch.float32)
            b_dev = b[start:stop].to(self.device, torch.float32)
            out[start:stop] = flow_midpoint(a_dev, b_dev, self.settings)[0].cpu()
            self.generated += stop - start
            if self.progress is not None:
                self.progress.update(stop - start)
        return out.reshape(gaps, phases, x, y).to(left.dtype)

    def describe(self):
        return {"method": self.name, "generated_slices": self.generated}

    def close(self):
        if self.progress is not None:
            self.progress.close()
