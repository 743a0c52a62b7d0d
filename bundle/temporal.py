"""Fusion over a cine's phases: each new slice averaged with its motion-compensated copies from
the neighbouring phases.

A midpoint predictor sees one phase at a time; the slice it predicts is the same anatomy a
few tens of milliseconds earlier and later, at neighbouring phases, where the same predictor
made independent errors (and the acquired neighbours carried independent noise). Registering
the predictions at phases t - N .. t + N onto the one at phase t (the same TV-L1 flow as
:mod:`bundle.motion`) and averaging them keeps the anatomy of phase t and averages those
errors out. The cine is treated as one periodic cycle (the phase after the last is the first),
and the window is a fraction of it, so that a 10-phase cine fuses over the same time as a
20-phase one. Fused only between neighbours far apart, where the predictions' errors are large:
on phantoms it lost at 4 mm gaps (the anatomy of a plane changes over the cycle, which in-plane
registration cannot undo).

How the fraction and the narrowest gap were chosen (leave-one-out on the training studies
SCD0000101/0201/0301 and phantoms, heart region): docs/README.md, "Fusion over phases".
"""

from __future__ import annotations

import logging
import math

import torch

from .motion import FlowSettings, midpoint_flow, pairs_per_chunk, warp
from .upsample import narrower_than

# each side of a phase, the fraction of the cycle fused (3 phases of a 20-phase cine), and the
# narrowest gap fused: chosen on the training studies and phantoms (docs/README.md)
DEFAULT_FRACTION = 0.15
FUSE_FROM_MM = 16.0
logger = logging.getLogger(__name__)


def register_onto(fixed: torch.Tensor, moving: torch.Tensor, settings: FlowSettings = FlowSettings()) -> torch.Tensor:
    """``moving`` (N, 1, H, W) warped onto ``fixed``: with the symmetric flow u of the pair,
    ``fixed(x - u/2) ~ moving(x + u/2)``, so ``moving(x + u) ~ fixed(x)`` to first order."""
    return warp(moving.float(), midpoint_flow(fixed.float(), moving.float(), settings))


def fusion_window(phases: int, fraction: float) -> int:
    """How many phases each side lie within ``fraction`` of the cardiac cycle, the cine of
    ``phases`` phases taken as one cycle: floor(fraction * phases) (0: nothing to fuse, e.g. an
    ED/ES pair)."""
    return int(math.floor(fraction * phases + 1e-9))


def fusable(phases: int, window: int) -> bool:
    """Whether a cine of ``phases`` phases has the 2 * ``window`` other phases to average (each once)."""
    return window > 0 and phases >= 2 * window + 1


def why_not_fused(phases, gap_mm, fraction=DEFAULT_FRACTION, from_mm=FUSE_FROM_MM):
    """Why the new slices of a cine of ``phases`` phases between neighbours ``gap_mm`` apart are
    left as predicted (None: they are fused)."""
    if narrower_than(gap_mm, from_mm):
        return f"neighbours {gap_mm:.4g} mm apart"
    if not fusable(phases, fusion_window(phases, fraction)):
        return f"{phases} phases"
    return None


def registered_phases(
    slices: torch.Tensor, window: int, settings: FlowSettings = FlowSettings(), device="cpu", memory_budget_mb=256
):
    """(N, T, X, Y) slices over a cine of T phases -> for each shift s = 1, -1, 2, -2, ... up to
    ``window``: (s, the (N, T, X, Y) float slices of phase t + s, cyclic, registered onto those
    of phase t), the flow computed in chunks that fit ``memory_budget_mb``."""
    n, t, x, y = slices.shape
    fixed = slices.reshape(n * t, 1, x, y).float()
    chunk = pairs_per_chunk(x, y, memory_budget_mb)
    for shift in [s for k in range(1, window + 1) for s in (k, -k)]:
        moving = slices.roll(-shift, dims=1).reshape(n * t, 1, x, y).float()  # phase t + shift
        parts = [slice(start, start + chunk) for start in range(0, n * t, chunk)]
        copies = [register_onto(fixed[p].to(device), moving[p].to(device), settings).cpu() for p in parts]
        yield shift, torch.cat(copies).reshape(n, t, x, y)


def fuse_phases(
    slices: torch.Tensor, window: int, settings: FlowSettings = FlowSettings(), device="cpu", memory_budget_mb=256
) -> torch.Tensor:
    """(N, T, X, Y) predicted slices of N gaps over a cine of T phases -> each phase's slice
    averaged with the 2 * ``window`` slices of the phases around it, registered onto it
    (:func:`registered_phases`). Unchanged when the cine has too few phases (:func:`fusable`)."""
    if not fusable(slices.shape[1], window):
        return slices
    total = slices.float().clone()
    for _, copy in registered_phases(slices, window, settings, device, memory_budget_mb):
        total += copy
    return (total / (2 * window + 1)).to(slices.dtype)


class PhaseFusion:
    """Midpoint predictor (the protocol of :mod:`bundle.upsample`): another predictor's slices,
    each fused with the phases within ``fraction`` of the cardiac cycle before and after it
    (:func:`fusion_window`, :func:`fuse_phases`), between neighbours at least ``from_mm`` apart
    (closer ones, where it was measured to lose, are left as predicted). It needs whole cines,
    so the bisection hands it every phase at once."""

    needs_all_phases = True

    def __init__(self, inner, fraction=DEFAULT_FRACTION, from_mm=FUSE_FROM_MM, device="cpu", progress=None):
        if not 0 < fraction < 0.5:
            raise ValueError(f"fraction must be above 0 and below 0.5, got {fraction}")
        self.inner, self.fraction, self.from_mm = inner, float(fraction), from_mm
        self.device = torch.device(device)
        self.progress = progress
        self.fused, self.kept = 0, set()  # slices fused; why others were left as predicted

    @torch.inference_mode()
    def __call__(self, left, right, gap_mm=None, phase_offset=0):
        return self.fuse(self.inner(left, right, gap_mm, phase_offset=phase_offset), gap_mm)

    @torch.inference_mode()
    def fuse(self, middles, gap_mm):
        """The inner predictor's (gaps, phases, X, Y) slices between neighbours ``gap_mm`` apart,
        fused over phases where that was measured to help (else returned as they are)."""
        gaps, phases = middles.shape[:2]
        reason = why_not_fused(phases, gap_mm, self.fraction, self.from_mm)
        if reason:
            if reason not in self.kept:  # expected at narrow gaps, so told, not warned
                logger.info("fusion over phases left out (%s)", reason)
            self.kept.add(reason)
            return middles
        middles = fuse_phases(middles, fusion_window(phases, self.fraction), device=self.device)
        self.fused += gaps * phases
        if self.progress is not None:
            self.progress.update(gaps * phases)
        return middles

    def describe(self):
        report = dict(self.inner.describe())
        report["phase_fusion"] = self.fraction
        if self.kept:  # it needs neighbours from_mm apart (it lost below) and the phases within the fraction
            report["phase_fusion_left_out"] = sorted(self.kept)
        return report

    def close(self):
        self.inner.close()
        if self.progress is not None:
            self.progress.close()
