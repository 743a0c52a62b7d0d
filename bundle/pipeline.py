"""Upsampling as a MONAI inference workflow: the bisection inferer, files in and out, and the
bundle's evaluator.

:class:`BisectionInferer` is a MONAI ``Inferer``: a sparse :class:`SaxStack` in, the dense one out,
with the midpoint predictor its :class:`UpsampleOptions` name (linear, flow, or the learned model
given as the network). :func:`upsample_file` adds reading, the checks that come before any work,
atomic writing and the preview; the CLI, the batch, the MONAI Label task and the bundle's
evaluator (:class:`UpsampleEvaluator`, which runs only when ``run()`` is called) all go through it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
from monai.inferers import Inferer

from .errors import InputRefused
from .io import check_output_path, check_writable_folder, read_sax, write_nifti
from .options import UpsampleOptions, as_flag
from .stack import SaxStack
from .upsample import linear_midpoints, phases_per_chunk, upsample_stack

logger = logging.getLogger(__name__)


class BisectionInferer(Inferer):
    """Dense stack from a sparse one by bisection, with the midpoint predictor of ``options``.

    ``network``: for method calid, a loaded :class:`bundle.weights.CaLIDModel` (None: loaded from
    ``options.weights``); ignored by flow and linear. Returns the dense stack and, with
    ``samples`` > 1, the per-voxel standard deviation of the samples (else None).
    """

    def __init__(self, options: UpsampleOptions | None = None, **values):
        super().__init__()
        self.options = UpsampleOptions.of(options, **values)

    def __call__(self, inputs: SaxStack, network=None, progress=True, workdir=None):
        opts = self.options
        stack = inputs.validate()
        predictors = self.predictors(stack, network, progress)
        x, y, z, t = stack.shape
        shape = (x, y, (z - 1) * opts.factor + 1, t)
        group = phases_per_chunk(stack.shape, opts.factor, opts.memory_budget_mb)
        with _OutputArrays(workdir, shape, opts.memory_budget_mb) as arrays:
            mean = arrays.new()
            dense = upsample_stack(stack, opts.factor, predictors[0], phase_chunk=group, out=mean)
            std = None
            if len(predictors) > 1:  # Welford's running mean and variance, phase by phase
                m2, draw = arrays.new(zero=True), arrays.new()
                for i, predictor in enumerate(predictors[1:], start=2):
                    upsample_stack(stack, opts.factor, predictor, phase_chunk=group, out=draw)
                    for p in range(t):
                        delta = draw[..., p] - mean[..., p]
                        mean[..., p] += delta / i
                        m2[..., p] += delta * (draw[..., p] - mean[..., p])
                mean[:, :, :: opts.factor] = stack.array  # acquired slices stay exact
                for p in range(t):
                    m2[..., p] = np.sqrt(m2[..., p] / len(predictors))
                m2[:, :, :: opts.factor] = 0.0
                std = SaxStack(m2, dense.affine, dict(dense.meta))
        # a memory-mapped result stays readable after its file is removed (POSIX), until released
        for predictor in predictors:
            predictor.close()  # the progress bar ends its line before anything is logged
        report = predictors[0].describe()
        dense.meta.update(report, seed=opts.seed)
        for line in report.get("notes", ()):
            logger.warning("%s", line)
        return dense, std

    def predictors(self, stack, model=None, progress=True):
        """The midpoint predictors: one, or one per sample (different noise each) for the learned
        model; they share one progress bar over the slices they generate."""
        opts = self.options
        if opts.method == "linear":
            return [linear_midpoints]
        from tqdm.auto import tqdm

        from .devices import resolve_device
        from .inference import LearnedMidpoints
        from .motion import FlowMidpoints
        from .temporal import PhaseFusion, why_not_fused
        from .weights import load_model

        device = resolve_device(opts.device)
        z, t = stack.shape[2], stack.shape[3]

        def new_slices(levels, per_gap):  # what the predictors generate at those levels
            return sum((z - 1) * 2**level * per_gap for level in levels)

        def fusing(predictor, bar):  # fusion over phases counts on the same bar, once per fused slice
            if not opts.phase_fusion:
                return predictor
            return PhaseFusion(predictor, opts.phase_fusion, device=device, progress=bar)

        gaps = [stack.slice_spacing / 2**level for level in range(opts.levels)]
        fused_levels = [
            k for k, gap in enumerate(gaps) if opts.phase_fusion and not why_not_fused(t, gap, opts.phase_fusion)
        ]
        fused = new_slices(fused_levels, t)

        if opts.method == "flow":
            bar = tqdm(
                total=new_slices(range(opts.levels), t) + fused, desc="flow midpoints", unit="slice",
                disable=not progress,
            )  # fmt: skip
            return [fusing(FlowMidpoints(device=device, progress=bar), bar)]
        model = model if model is not None else load_model(opts.weights, device=device)
        modelled = [level for level, gap in enumerate(gaps) if not model.info.falls_back(gap)]  # else flow fills them
        if opts.adapt and not modelled:  # minutes for nothing
            logger.warning(
                "--adapt: not adapted: flow midpoints fill every gap of this stack (%s mm), all below the model's "
                "fallback_below_mm (%g mm)", ", ".join(f"{g:.4g}" for g in gaps), model.info.fallback_below_mm,
            )  # fmt: skip
        elif opts.adapt:
            from .adapt import adapt_model

            model = adapt_model(model, stack, opts.adapt, device=device, seed=opts.seed, progress=progress)
        if opts.samples > 1 and (opts.refine or model.info.start == "mean"):
            logger.warning(
                "--samples: every sample starts from the same latents (--refine inverts the neighbours; this model "
                "starts from the prior's mean, start in model.json): the samples are identical"
            )
        pre = model.preprocessor(stack)
        fallback = FlowMidpoints(device=device)  # one for all samples: flow has one answer
        predictors = [
            LearnedMidpoints(
                model, pre, num_steps=opts.steps or model.info.steps, refine=opts.refine, seed=opts.seed,
                sample=sample, chunk_size=opts.chunk_size or (64 if device.type == "cuda" else 8), device=device,
                precision=opts.precision, fallback=fallback,
            )  # fmt: skip
            for sample in range(opts.samples)
        ]
        # the bar counts the slices the model generates; those filled by flow are told in the log
        per_gap = 1 if model.temporal else t
        total = (new_slices(modelled, per_gap) + fused) * opts.samples
        bar = tqdm(total=total, desc="generating slices", unit="slice", disable=not progress or not total)
        for predictor in predictors:
            predictor.progress = bar
        return [fusing(predictor, bar) for predictor in predictors]


def check_output_size(shape, options: UpsampleOptions):
    """Refuse an output that would not fit in memory, saying how large it would be (with a
    memory budget the output arrays are memory-mapped instead, and this check is left out)."""
    if options.memory_budget_mb is not None:
        return
    x, y, z, t = shape
    slices = (z - 1) * options.factor + 1
    needed = x * y * slices * t * 4 * (3 if options.samples > 1 else 1)  # mean, running variance, one draw
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > 0.8 * available:
        raise InputRefused(
            f"the output would take {needed / 2**30:.1f} GiB ({x} x {y} x {slices} slices x {t} phases, float32) "
            f"but this machine has {available / 2**30:.1f} GiB of memory; use a smaller factor or --memory-budget-mb"
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
    options: UpsampleOptions | None = None,
    *,
    inferer: BisectionInferer | None = None,
    network=None,
    preview_path=None,
    series_uid=None,
    phase=0,
    progress=True,
    **values,
):
    """Read, upsample, write atomically (and optionally a preview PNG and, with ``samples`` > 1,
    the per-voxel standard deviation of the samples); everything is checked before anything is
    written. Options: an :class:`UpsampleOptions`, or its values as keywords (``factor=4``), or
    an ``inferer`` that holds them. Returns (input stack, output stack, seconds)."""
    if inferer is None:
        inferer = BisectionInferer(options, **values)
    elif options is not None or values:
        raise TypeError("give the options or an inferer that holds them, not both")
    opts, progress = inferer.options, as_flag(progress, "progress")
    output_path = check_output_path(output_path, inputs=[input_path], overwrite=opts.overwrite)
    if opts.samples > 1:
        check_output_path(std_map_path(output_path), inputs=[input_path], overwrite=opts.overwrite)
    if preview_path is not None:
        if Path(preview_path).exists() and not opts.overwrite:
            raise InputRefused(f"{preview_path} exists; pass --overwrite to replace it")
        check_writable_folder(Path(preview_path).parent)
    if opts.method != "linear":
        from .devices import resolve_device

        resolve_device(opts.device)
    if opts.method == "calid" and network is None:
        from .weights import check_weights

        check_weights(opts.weights)
    start = time.perf_counter()
    stack = read_sax(input_path, series_uid=series_uid)
    check_output_size(stack.shape, opts)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    dense, std = inferer(stack, network, progress=progress, workdir=output_path.parent)
    if std is not None:  # first: an existing main output then means a complete study
        write_nifti(std, std_map_path(output_path), overwrite=opts.overwrite, inputs=[input_path])
    write_nifti(dense, output_path, overwrite=opts.overwrite, inputs=[input_path])
    seconds = time.perf_counter() - start
    if preview_path is not None:
        from .preview import save_preview

        save_preview(stack, dense, preview_path, phase=phase)
    return stack, dense, seconds


class UpsampleEvaluator:
    """The bundle's evaluator: :func:`upsample_file` for every item of ``dataset`` (dicts with
    ``image``, ``output`` and optionally ``preview``), with ``inferer`` and ``network``. Nothing
    runs until :meth:`run`; each written file is printed."""

    def __init__(self, dataset, inferer: BisectionInferer, network=None):
        self.dataset, self.inferer, self.network = list(dataset), inferer, network

    def run(self):
        written = []
        for item in self.dataset:
            _, dense, seconds = upsample_file(
                item["image"],
                item["output"],
                inferer=self.inferer,
                network=self.network,
                preview_path=item.get("preview"),
            )
            label = dense.meta["method"] + (f", {dense.meta['steps']} steps" if "steps" in dense.meta else "")
            print(f"wrote {item['output']} ({label}, x{self.inferer.options.factor}, {seconds:.1f} s)")
            written.append(item["output"])
        return written


class _OutputArrays:
    """Output-sized float32 arrays: in memory, or memory-mapped in a hidden temporary folder in
    ``folder`` (the output's) when one would take more than half of ``memory_budget_mb``."""

    def __init__(self, folder, shape, memory_budget_mb=None):
        self.folder, self.shape = Path(folder or "."), shape
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
