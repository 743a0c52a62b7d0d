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
measured to beat it.

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
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import InputRefused
from .io import check_output_path, check_writable_folder, read_sax, write_nifti
from .options import as_flag
from .stack import SaxStack

logger = logging.getLogger(__name__)

# predictor(left, right, gap_mm, phase_offset=0) -> middle; tensors (N, T, X, Y): N gaps, T phases.
MidpointPredictor = Callable[..., torch.Tensor]
METHODS = ("flow", "calid", "linear")
DEFAULT_METHOD = "flow"  # training-free, and measured better than the shipped learned model


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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_STEPS = 1000  # the noise schedule's training timesteps: DDIM cannot take more steps


def check_model_options(steps, chunk_size, precision):
    """Refuse learned-model options that would be silently changed or ignored."""
    if steps is not None and not _whole_number_in(steps, 1, MAX_STEPS):
        raise InputRefused(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    if chunk_size is not None and not _whole_number_in(chunk_size, 1, float("inf")):
        raise InputRefused(f"chunk size must be a whole number of at least 1, got {chunk_size!r}")
    if precision not in PRECISIONS:
        raise InputRefused(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _whole_number_in(value, low, high):
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_output_size(shape, factor, samples=1, memory_budget_mb=None):
    """Refuse an output that would not fit in memory, saying how large it would be (with a
    memory budget the output arrays are memory-mapped instead, and this check is left out)."""
    if memory_budget_mb is not None:
        return
    x, y, z, t = shape
    arrays = 3 if samples > 1 else 1  # mean, plus the running variance and one draw
    needed = x * y * ((z - 1) * factor + 1) * t * 4 * arrays
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > 0.8 * available:
        raise InputRefused(
            f"the output would take {needed / 2**30:.1f} GiB ({x} x {y} x {(z - 1) * factor + 1} slices x {t} "
            f"phases, float32) but this machine has {available / 2**30:.1f} GiB of memory; use a smaller factor "
            f"or --memory-budget-mb (calid upsample-batch)"
        )


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
    method=DEFAULT_METHOD,
    num_inference_steps=None,
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
    memory_budget_mb=None,
):
    """Read, upsample, write atomically (and optionally a preview PNG and, with ``samples`` > 1,
    the per-voxel standard deviation of the samples); everything is checked before anything
    is written. The CLI, the bundle's inference config and batch upsampling all call this.

    ``memory_budget_mb`` bounds the working memory: phases are bisected in groups that fit, and
    output-sized arrays that would not fit live in memory maps beside the output.
    Returns (input stack, output stack, seconds)."""
    levels = bisection_levels(factor)
    if method not in METHODS:
        raise InputRefused(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    refine, overwrite = as_flag(refine, "refine"), as_flag(overwrite, "overwrite")
    progress = as_flag(progress, "progress")
    samples = int(samples)
    if samples < 1:
        raise InputRefused(f"samples must be at least 1, got {samples}")
    if samples > 1 and method != "calid":
        raise InputRefused(f"--samples draws from the learned model: {method} interpolation has one answer")
    output_path = check_output_path(output_path, inputs=[input_path], overwrite=overwrite)
    if samples > 1:
        check_output_path(std_map_path(output_path), inputs=[input_path], overwrite=overwrite)
    if preview_path is not None:
        if Path(preview_path).exists() and not overwrite:
            raise InputRefused(f"{preview_path} exists; pass --overwrite to replace it")
        check_writable_folder(Path(preview_path).parent)
    check_model_options(num_inference_steps, chunk_size, precision)
    if method != "linear":
        from .devices import resolve_device

        device = resolve_device(device)
    start = time.perf_counter()
    stack = read_sax(input_path, series_uid=series_uid)
    check_output_size(stack.shape, factor, samples, memory_budget_mb)
    predictors = _make_predictors(
        method, stack, levels, num_inference_steps, refine, samples, seed, device, weights_dir, chunk_size, precision,
        progress,
    )  # fmt: skip
    x, y, z, t = stack.shape
    shape = (x, y, (z - 1) * factor + 1, t)
    group = phases_per_chunk(stack.shape, factor, memory_budget_mb)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with _OutputArrays(output_path.parent, shape, memory_budget_mb) as arrays:
        mean = arrays.new()
        dense = upsample_stack(stack, factor, predictors[0], phase_chunk=group, out=mean)
        std = None
        if len(predictors) > 1:  # Welford's running mean and variance, phase by phase
            m2, draw = arrays.new(zero=True), arrays.new()
            for i, predictor in enumerate(predictors[1:], start=2):
                upsample_stack(stack, factor, predictor, phase_chunk=group, out=draw)
                for p in range(t):
                    delta = draw[..., p] - mean[..., p]
                    mean[..., p] += delta / i
                    m2[..., p] += delta * (draw[..., p] - mean[..., p])
            mean[:, :, ::factor] = stack.array  # acquired slices stay exact
            for p in range(t):
                m2[..., p] = np.sqrt(m2[..., p] / len(predictors))
            m2[:, :, ::factor] = 0.0
            std = SaxStack(m2, dense.affine, dict(dense.meta))
        for predictor in predictors:
            predictor.close()  # the progress bar ends its line before anything is logged
        report = predictors[0].describe()
        dense.meta.update(report, seed=seed)
        for line in report.get("notes", ()):
            logger.warning("%s", line)
        if std is not None:  # first: an existing main output then means a complete study
            write_nifti(std, std_map_path(output_path), overwrite=overwrite, inputs=[input_path])
        write_nifti(dense, output_path, overwrite=overwrite, inputs=[input_path])
        seconds = time.perf_counter() - start
        if preview_path is not None:
            from .preview import save_preview

            save_preview(stack, dense, preview_path, phase=phase)
    # a memory-mapped result stays readable after its file is removed (POSIX), until released
    return stack, dense, seconds


class _OutputArrays:
    """Output-sized float32 arrays: in memory, or memory-mapped in a hidden temporary folder
    beside the output when one would take more than half of ``memory_budget_mb``."""

    def __init__(self, folder, shape, memory_budget_mb=None):
        self.folder, self.shape = Path(folder), shape
        nbytes = int(np.prod(shape)) * 4
        self.mapped = memory_budget_mb is not None and nbytes > memory_budget_mb * 2**20 / 2
        self.tmp = None

    def __enter__(self):
        if self.mapped:
            import tempfile

            self.tmp = Path(tempfile.mkdtemp(prefix=".calid-memmap-", dir=self.folder))
        return self

    def new(self, zero=False):
        if not self.mapped:
            return np.zeros(self.shape, np.float32) if zero else np.empty(self.shape, np.float32)
        index = len(list(self.tmp.iterdir()))
        return np.memmap(self.tmp / f"array{index}.dat", dtype=np.float32, mode="w+", shape=self.shape)

    def __exit__(self, *exc):
        if self.tmp is not None:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def _make_predictors(
    method, stack, levels, steps, refine, samples, seed, device, weights_dir, chunk_size, precision, progress
):
    """The midpoint predictors of ``method``: one, or one per sample (different noise each) for
    the learned model; they share one progress bar over the slices they generate."""
    if method == "linear":
        return [linear_midpoints]
    from tqdm.auto import tqdm

    from .devices import resolve_device
    from .inference import LearnedMidpoints
    from .motion import FlowMidpoints
    from .weights import load_model

    device = resolve_device(device)
    z, t = stack.shape[2], stack.shape[3]

    def new_slices(bisected_levels, per_gap):  # what the predictors generate at those levels
        return sum((z - 1) * 2**level * per_gap for level in bisected_levels)

    if method == "flow":
        bar = tqdm(total=new_slices(range(levels), t), desc="flow midpoints", unit="slice", disable=not progress)
        return [FlowMidpoints(device=device, progress=bar)]

    model = load_model(weights_dir, device=device)
    if refine and samples > 1:
        logger.warning("--refine starts every sample from the same inverted latents: the samples are identical")
    pre = model.preprocessor(stack)
    chunk_size = chunk_size or (64 if device.type == "cuda" else 8)
    fallback = FlowMidpoints(device=device)  # one for all samples: flow has one answer
    predictors = [
        LearnedMidpoints(
            model, pre, num_steps=steps or model.info.steps, refine=refine, seed=seed, sample=sample,
            chunk_size=chunk_size, device=device, precision=precision, fallback=fallback,
        )  # fmt: skip
        for sample in range(samples)
    ]
    # the bar counts the slices the model generates; those filled by flow are told in the log
    per_gap = 1 if model.temporal else t
    modelled = [level for level in range(levels) if not predictors[0].falls_back(stack.slice_spacing / 2**level)]
    total = new_slices(modelled, per_gap) * samples
    bar = tqdm(total=total, desc="generating slices", unit="slice", disable=not progress or not total)
    for predictor in predictors:
        predictor.progress = bar
    return predictors
