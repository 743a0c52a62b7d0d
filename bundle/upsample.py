"""Slice upsampling by bisection, and the output contract every method meets.

For an input of Z slices and a factor f = 2**k the output has (Z - 1) * f + 1 slices on the
same in-plane grid; the affine's slice column is the input's divided by f (same origin);
output slice k * f is acquired slice k, value for value; phases are kept; new slices are in
the input's intensity scale.

The bisection engine is method-agnostic: a *midpoint predictor* receives the left and right
neighbours of every gap at one level and returns the slices halfway between them. Three ship:
linear interpolation, ``(left + right) / 2`` (applied recursively this is exactly linear
interpolation); the motion-compensated flow midpoint (:mod:`bundle.motion`, the default); and
the learned CaLID model (:mod:`bundle.inference`), which falls back to flow where it was not
measured to beat it. :class:`bundle.temporal.PhaseFusion` wraps flow or CaLID to average each new
slice with its motion-compensated copies at the neighbouring phases (the default between far
neighbours).

The predictor protocol: ``predictor(left, right, gap_mm, phase_offset=0) -> middles`` with
tensors (gaps, phases, X, Y) in scanner intensities (``gap_mm`` the distance between the
neighbours, None where unknown; ``phase_offset`` the study index of the first phase, for
per-item seeds);
``needs_all_phases`` (the 2D+T model must see whole cines); ``describe()`` -> a dict saying what
it did, for the log and the output's metadata; ``close()`` releases what it holds.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import numpy as np
import torch

from .errors import InputRefused
from .stack import SaxStack

logger = logging.getLogger(__name__)

# predictor(left, right, gap_mm, phase_offset=0) -> middle; tensors (N, T, X, Y): N gaps, T phases.
MidpointPredictor = Callable[..., torch.Tensor]

# gaps are compared with this tolerance relative to the limit: real spacings come out as
# 15.9999 mm where the protocol says 16
GAP_TOLERANCE = 0.01


def narrower_than(gap_mm, limit_mm) -> bool:
    """Whether neighbours ``gap_mm`` apart are closer than ``limit_mm`` (within GAP_TOLERANCE);
    an unknown gap (None) or no limit never is."""
    return gap_mm is not None and bool(limit_mm) and gap_mm < limit_mm * (1 - GAP_TOLERANCE)


def bisection_levels(factor) -> int:
    """Number of bisection levels for ``factor``; refuses anything but a power of two >= 1."""
    try:
        f = int(factor)
    except (TypeError, ValueError):
        raise InputRefused(f"factor must be a power of two (1, 2, 4, 8, ...), got {factor!r}") from None
    if f != factor or f < 1 or f & (f - 1):
        raise InputRefused(
            f"factor must be a power of two (1, 2, 4, 8, ...), got {factor!r}; other factors are not supported yet"
        )
    return f.bit_length() - 1


class LinearMidpoints:
    """The average of the neighbours: bisection with it is linear interpolation."""

    name = "linear"
    needs_all_phases = False

    def __call__(self, left: torch.Tensor, right: torch.Tensor, gap_mm=None, phase_offset: int = 0):
        return 0.5 * (left + right)

    def describe(self):
        return {"method": self.name}

    def close(self):
        pass


linear_midpoints = LinearMidpoints()


def bisect(
    slices: torch.Tensor, factor: int, predictor: MidpointPredictor, spacing_mm=None, phase_offset: int = 0
) -> torch.Tensor:
    """Upsample ``slices`` (Z, T, X, Y) to ((Z - 1) * factor + 1, T, X, Y) by repeated bisection.

    At each level every gap is predicted in one call, using the slices of previous levels as
    neighbours; known slices are copied, never regenerated. ``spacing_mm`` is the distance
    between the given slices (the predictor is told each level's gap); ``phase_offset`` is the
    index of the first phase of ``slices`` in the study (predictors that seed per phase need it).
    """
    levels = bisection_levels(factor)
    current = slices
    for level in range(levels):
        gap_mm = None if spacing_mm is None else float(spacing_mm) / 2**level
        middles = predictor(current[:-1], current[1:], gap_mm, phase_offset=phase_offset)
        if middles.shape != current[:-1].shape:
            raise RuntimeError(
                f"midpoint predictor returned {tuple(middles.shape)}, expected {tuple(current[:-1].shape)}"
            )
        out = torch.empty((2 * current.shape[0] - 1, *current.shape[1:]), dtype=current.dtype, device=current.device)
        out[0::2] = current
        out[1::2] = middles.to(current.dtype)
        current = out
    return current


def phases_per_chunk(shape, factor, memory_budget_mb=None):
    """How many phases to bisect at once so that the float64 working arrays (about three
    output-sized copies per phase) stay within ``memory_budget_mb``; all phases without one."""
    x, y, z, t = shape
    if memory_budget_mb is None:
        return t
    per_phase = 3 * x * y * ((z - 1) * factor + 1) * 8
    return int(min(t, max(1, memory_budget_mb * 2**20 // per_phase)))


def upsample_stack(
    stack: SaxStack, factor: int, predictor: MidpointPredictor = linear_midpoints, phase_chunk=None, out=None
) -> SaxStack:
    """Apply the bisection engine to a :class:`SaxStack`, meeting the output contract.

    Phases are bisected ``phase_chunk`` at a time (all at once by default; always all at once
    for predictors with ``needs_all_phases``, the 2D+T model); the result is float32, written
    into ``out`` if given (e.g. a memory map)."""
    bisection_levels(factor)
    stack.validate()
    x, y, z, t = stack.shape
    dense = out if out is not None else np.empty((x, y, (z - 1) * factor + 1, t), dtype=np.float32)
    group = t if phase_chunk is None or getattr(predictor, "needs_all_phases", False) else max(1, int(phase_chunk))
    for first in range(0, t, group):
        # float64 keeps the acquired values exact for any input dtype
        part = np.ascontiguousarray(stack.array[:, :, :, first : first + group].transpose(2, 3, 0, 1), dtype=np.float64)
        result = bisect(torch.from_numpy(part), factor, predictor, stack.slice_spacing, phase_offset=first)
        dense[:, :, :, first : first + group] = result.numpy().transpose(2, 3, 0, 1)
    affine = stack.affine.copy()
    affine[:3, 2] = stack.affine[:3, 2] / factor
    meta = copy.deepcopy(stack.meta)
    meta.pop("instance_numbers", None)  # they name acquired images, not the new grid
    meta["factor"] = int(factor)
    return SaxStack(dense, affine, meta)
