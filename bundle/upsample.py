"""Slice upsampling by bisection, and the output contract every method meets.

For an input of Z slices and a factor f = 2**k the output has (Z - 1) * f + 1 slices on the
same in-plane grid; the affine's slice column is the input's divided by f (same origin);
output slice k * f is acquired slice k, value for value; phases are kept; new slices are in
the input's intensity scale.

The bisection engine is method-agnostic: a *midpoint predictor* receives the left and right
neighbours of every gap at one level and returns the slices halfway between them. Linear
interpolation is the midpoint predictor ``(left + right) / 2`` (applied recursively this is
exactly linear interpolation); the learned model plugs in the same way.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .io import SaxInputError, SaxStack, check_output_path, read_sax, write_nifti

logger = logging.getLogger(__name__)

# predictor(left, right, level) -> middle; tensors (N, T, X, Y) with N gaps, T phases.
MidpointPredictor = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def bisection_levels(factor) -> int:
    """Number of bisection levels for ``factor``; refuses anything but a power of two >= 1."""
    try:
        f = int(factor)
    except (TypeError, ValueError):
        raise SaxInputError(f"factor must be a power of two (1, 2, 4, 8, ...), got {factor!r}") from None
    if f != factor or f < 1 or f & (f - 1):
        raise SaxInputError(
            f"factor must be a power of two (1, 2, 4, 8, ...), got {factor!r}; other factors are not supported yet"
        )
    return f.bit_length() - 1


def linear_midpoints(left: torch.Tensor, right: torch.Tensor, level: int) -> torch.Tensor:
    return 0.5 * (left + right)


def bisect(slices: torch.Tensor, factor: int, predictor: MidpointPredictor) -> torch.Tensor:
    """Upsample ``slices`` (Z, T, X, Y) to ((Z - 1) * factor + 1, T, X, Y) by repeated bisection.

    At each level every gap is predicted in one call, using the slices of previous levels as
    neighbours; known slices are copied, never regenerated.
    """
    levels = bisection_levels(factor)
    current = slices
    for level in range(levels):
        middles = predictor(current[:-1], current[1:], level)
        if middles.shape != current[:-1].shape:
            raise RuntimeError(
                f"midpoint predictor returned {tuple(middles.shape)}, expected {tuple(current[:-1].shape)}"
            )
        out = torch.empty((2 * current.shape[0] - 1, *current.shape[1:]), dtype=current.dtype, device=current.device)
        out[0::2] = current
        out[1::2] = middles.to(current.dtype)
        current = out
    return current


def upsample_stack(stack: SaxStack, factor: int, predictor: MidpointPredictor = linear_midpoints) -> SaxStack:
    """Apply the bisection engine to a :class:`SaxStack`, meeting the output contract."""
    bisection_levels(factor)
    stack.validate()
    # float64 keeps the acquired values exact for any input dtype; written as float32 later.
    slices = torch.from_numpy(np.ascontiguousarray(stack.array.transpose(2, 3, 0, 1), dtype=np.float64))
    dense = bisect(slices, factor, predictor)
    affine = stack.affine.copy()
    affine[:3, 2] = stack.affine[:3, 2] / factor
    meta = copy.deepcopy(stack.meta)
    meta["factor"] = int(factor)
    return SaxStack(dense.numpy().transpose(2, 3, 0, 1), affine, meta)


METHODS = ("calid", "linear")


def std_map_path(output_path) -> Path:
    """Where ``--samples N`` writes the per-voxel standard deviation: ``OUT_std.nii.gz``."""
    output_path = Path(output_path)
    name = output_path.name
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    return output_path.with_name(name[: -len(suffix)] + "_std" + suffix)


def upsample_file(
    input_path,
    output_path,
    factor=2,
    method="calid",
    num_inference_steps=8,
    refine=False,
    samples=1,
    seed=0,
    device="auto",
    weights_dir=None,
    preview_path=None,
    overwrite=False,
    series_uid=None,
    phase=0,
    chunk_size=None,
    precision="auto",
    progress=True,
):
    """Read, upsample, write atomically (and optionally a preview PNG and, with ``samples`` > 1,
    the per-voxel standard deviation of the samples); everything is checked before anything
    is written. The CLI and the bundle's inference config both call this.
    Returns (input stack, output stack, seconds)."""
    levels = bisection_levels(factor)
    if method not in METHODS:
        raise SaxInputError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    samples = int(samples)
    if samples < 1:
        raise SaxInputError(f"samples must be at least 1, got {samples}")
    check_output_path(output_path, inputs=[input_path], overwrite=overwrite)
    if samples > 1:
        check_output_path(std_map_path(output_path), inputs=[input_path], overwrite=overwrite)
    if preview_path is not None and Path(preview_path).exists() and not overwrite:
        raise SaxInputError(f"{preview_path} exists; pass --overwrite to replace it")
    start = time.perf_counter()
    stack = read_sax(input_path, series_uid=series_uid)
    if method == "linear":
        draws = [upsample_stack(stack, factor, linear_midpoints)]
    else:
        draws = _calid_draws(
            stack,
            factor,
            levels,
            num_inference_steps,
            refine,
            samples,
            seed,
            device,
            weights_dir,
            chunk_size,
            precision,
            progress,
        )
    dense = draws[0]
    std = None
    if len(draws) > 1:
        arrays = np.stack([d.array for d in draws])
        dense = SaxStack(arrays.mean(0), draws[0].affine, draws[0].meta)
        dense.array[:, :, ::factor] = stack.array  # acquired slices stay exact
        std = SaxStack(arrays.std(0), draws[0].affine, dict(draws[0].meta))
        std.array[:, :, ::factor] = 0.0
    write_nifti(dense, output_path, overwrite=overwrite, inputs=[input_path])
    if std is not None:
        write_nifti(std, std_map_path(output_path), overwrite=overwrite, inputs=[input_path])
    seconds = time.perf_counter() - start
    if preview_path is not None:
        from .preview import save_preview

        save_preview(stack, dense, preview_path, phase=phase)
    return stack, dense, seconds


def _calid_draws(
    stack, factor, levels, steps, refine, samples, seed, device, weights_dir, chunk_size, precision, progress
):
    """``samples`` upsampled stacks with the learned model (different noise per sample)."""
    from tqdm.auto import tqdm

    from .inference import LearnedMidpoints, load_model, resolve_device
    from .transforms import SlicePreprocessor

    device = resolve_device(device)
    model = load_model(weights_dir, device=device)
    if refine and samples > 1:
        logger.warning("--refine starts every sample from the same inverted latents: the samples are identical")
    pre = SlicePreprocessor.for_stack(stack, model.model_spacing, model.size_multiple)
    z, t = stack.shape[2], stack.shape[3]
    per_gap = 1 if model.temporal else t
    total = sum((z - 1) * 2**level * per_gap for level in range(levels)) * samples
    chunk_size = chunk_size or (64 if device.type == "cuda" else 8)
    draws = []
    with tqdm(total=total, desc="generating slices", unit="slice", disable=not progress) as bar:
        for sample in range(samples):
            predictor = LearnedMidpoints(
                model, pre, num_steps=steps, refine=refine, seed=seed, sample=sample,
                chunk_size=chunk_size, device=device, precision=precision, progress=bar,
            )  # fmt: skip
            draw = upsample_stack(stack, factor, predictor)
            draw.meta.update(method="calid+" if refine else "calid", steps=steps, seed=seed, weights=model.source)
            draws.append(draw)
    return draws
