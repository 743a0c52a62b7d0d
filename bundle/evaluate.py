"""Evaluation against fixed interpolation, on data with a known answer.

- Real studies, the paper's protocol: every slice with both neighbours acquired is predicted
  from them (neighbours two acquisitions apart), every phase, and compared with the acquired
  slice.
- Phantom subjects: x4 from the sparse stack, compared with the dense truth at every generated
  position, per bisection level (level 1: neighbours 8 mm apart for an 8 mm stack; level 2: 4 mm).

Intensities are scaled by each study's robust range (0.5-99.5 percentiles to 0-1) before
PSNR/SSIM; the heart region is a square of ``heart_mm`` around the LV centre (from the
Sunnybrook contours or the phantom's labels, else the image centre). Methods: linear, the
motion-compensated flow midpoint (the product's default), the TV-L1 reference (scikit-image,
slow, for comparison only), the VAE-only latent blends, CaLID and CaLID+, flow and CaLID fused
over phases (:mod:`bundle.temporal`, flow-phases and calid-phases); with them a DDIM steps
sweep, LPIPS/rFID where their weights are local, and the downstream segmentation check of
:mod:`bundle.downstream`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .data import evenly_spread
from .errors import InputRefused
from .io import read_sax
from .metrics import psnr, ssim
from .motion import FlowMidpoints, warp
from .options import _fraction, _whole, as_flag
from .reports import report_markdown
from .stack import crop_inplane
from .studies import dicom_folder
from .temporal import DEFAULT_FRACTION, PhaseFusion
from .transforms import IntensityScaler
from .upsample import linear_midpoints, upsample_stack

HEART_MM = 80.0
logger = logging.getLogger(__name__)


def heart_box(stack, centre_xy=None, heart_mm=HEART_MM):
    """(x0, x1, y0, y1): a square of ``heart_mm`` around ``centre_xy`` (pixels), inside the image."""
    x, y = stack.shape[:2]
    half = [max(4, int(round(heart_mm / 2 / s))) for s in stack.pixel_spacing]
    cx, cy = centre_xy if centre_xy is not None else (x / 2, y / 2)
    x0 = int(np.clip(round(cx) - half[0], 0, max(0, x - 2 * half[0])))
    y0 = int(np.clip(round(cy) - half[1], 0, max(0, y - 2 * half[1])))
    return x0, min(x, x0 + 2 * half[0]), y0, min(y, y0 + 2 * half[1])


def scores(pred, truth, box, per_slice=False):
    """Mean PSNR/SSIM over slices (N, X, Y), whole slice and heart box (network scale); with
    ``per_slice`` also the heart scores of each slice, in order (for paired comparisons)."""
    p, t = torch.as_tensor(pred, dtype=torch.float32)[:, None], torch.as_tensor(truth, dtype=torch.float32)[:, None]
    x0, x1, y0, y1 = box
    ph, th = p[..., x0:x1, y0:y1], t[..., x0:x1, y0:y1]
    heart = {"psnr_heart": psnr(ph, th), "ssim_heart": ssim(ph, th)}
    result = {"psnr": float(psnr(p, t).mean()), "ssim": float(ssim(p, t).mean())}
    result.update({k: float(v.mean()) for k, v in heart.items()})
    if per_slice:
        result.update({f"{k}_per_slice": [round(float(x), 5) for x in v] for k, v in heart.items()})
    return result


def leave_one_out(stack, predictors: dict, centre_xy=None, phases=None, perceptual=None, heart_mm=HEART_MM):
    """Predict every inner slice from its acquired neighbours with each predictor.

    Returns (scores per method, predictions per method as (inner slices, phases, X, Y) in
    scanner intensities); the scores hold each slice's heart scores too, as lists of inner
    slices of lists of phases. ``phases`` restricts the phases (default all); ``perceptual`` a
    :class:`bundle.metrics.PerceptualMetrics` adds LPIPS/rFID on the whole slice. A
    :class:`PhaseFusion` over another of the ``predictors`` fuses that one's predictions instead
    of predicting them again (its time includes theirs)."""
    phases = list(range(stack.shape[3])) if phases is None else list(phases)
    scaler = IntensityScaler.fit(stack.array)
    slices = torch.from_numpy(np.ascontiguousarray(stack.array[..., phases].transpose(2, 3, 0, 1), dtype=np.float64))
    truth = scaler(slices[1:-1].flatten(0, 1).numpy())
    box = heart_box(stack, centre_xy, heart_mm)
    gap = 2 * stack.slice_spacing  # two acquisitions apart
    result, predictions, done = {}, {}, {}  # done: id(predictor) -> (its prediction, seconds)
    for name, predictor in predictors.items():
        start = time.perf_counter()
        inner = done.get(id(getattr(predictor, "inner", None)))
        if isinstance(predictor, PhaseFusion) and inner is not None:
            pred = predictor.fuse(inner[0], gap)
            seconds = time.perf_counter() - start + inner[1]
        else:
            pred = predictor(slices[:-2], slices[2:], gap)
            seconds = time.perf_counter() - start
        done[id(predictor)] = pred, seconds
        logger.info("%s: %d slices in %.1f s", name, pred.shape[0] * pred.shape[1], seconds)
        scaled = scaler(pred.flatten(0, 1).numpy())
        result[name] = scores(scaled, truth, box, per_slice=True)
        for key in ("psnr_heart_per_slice", "ssim_heart_per_slice"):  # [inner slice][phase]
            result[name][key] = np.reshape(result[name][key], pred.shape[:2]).tolist()
        result[name]["seconds_per_slice"] = seconds / len(scaled)
        _add_adaptation(result[name], predictor)
        if perceptual is not None:
            result[name].update(perceptual(scaled, truth))
        predictions[name] = pred.float().numpy()
    return result, predictions


def steps_sweep(stack, model, steps_list, centre_xy=None, phases=None, seed=0, device="cpu", fallback=True):
    """CaLID and CaLID+ at each number of DDIM steps: heart-region quality and time per slice."""
    sweep = {"calid": {}, "calid+": {}}
    for steps in steps_list:
        logger.info("steps sweep: %d DDIM steps", steps)
        predictors = make_predictors(stack, model, steps, seed, device, baselines=False, fallback=fallback)
        result, _ = leave_one_out(stack, {k: predictors[k] for k in sweep}, centre_xy, phases)
        for name in sweep:
            sweep[name][int(steps)] = {k: result[name][k] for k in ("psnr_heart", "ssim_heart", "seconds_per_slice")}
    return sweep


def phantom_per_level(sparse, truth, labels, predictors: dict, factor=4, heart_mm=HEART_MM):
    """x``factor`` against the dense truth, scores per bisection level and over all new slices."""
    step = (truth.shape[2] - 1) // ((sparse.shape[2] - 1) * factor)
    target = truth.array[:, :, ::step].astype(np.float64)
    scaler = IntensityScaler.fit(sparse.array)
    lv = np.argwhere(labels.array[:, :, :, 0] == 1)
    box = heart_box(sparse, lv[:, :2].mean(0) if len(lv) else None, heart_mm)
    positions = np.arange(target.shape[2])
    levels = {f"level {k + 1}": positions % (factor >> k) == factor >> (k + 1) for k in range(factor.bit_length() - 1)}
    levels["all new slices"] = positions % factor != 0
    result = {}
    for name, predictor in predictors.items():
        dense = upsample_stack(sparse, factor, predictor).array
        result[name] = {}
        for level, keep in levels.items():
            pred = dense[:, :, keep].transpose(2, 3, 0, 1).reshape(-1, *dense.shape[:2])
            ref = target[:, :, keep].transpose(2, 3, 0, 1).reshape(-1, *dense.shape[:2])
            result[name][level] = scores(scaler(pred), scaler(ref), box)
        _add_adaptation(result[name], predictor)
    return result


def _add_adaptation(result, predictor):
    """What an adapted model spent on adapting (steps, triplets, seconds), beside its scores."""
    adaptation = predictor.describe().get("adaptation") if hasattr(predictor, "describe") else None
    if adaptation:
        result["adaptation"] = adaptation


class TVL1Reference:
    """The reference for the flow predictor: scikit-image's TV-L1 in both directions on each slice
    normalised to its own [1, 99] percentiles, each neighbour warped half way along its flow,
    the two averaged. Seconds per slice on a CPU: for evaluation only."""

    name = "tvl1"
    needs_all_phases = False

    def __call__(self, left, right, gap_mm=None, phase_offset=0):
        from skimage.registration import optical_flow_tvl1

        gaps, phases, x, y = left.shape
        a, b = left.reshape(-1, x, y).float(), right.reshape(-1, x, y).float()
        out = torch.empty_like(a)
        for i in range(len(a)):
            na, nb = (_percentile_normalised(v.numpy()) for v in (a[i], b[i]))
            flow_ab = torch.from_numpy(optical_flow_tvl1(na, nb))[None].float()  # b(x + flow) ~ a(x)
            flow_ba = torch.from_numpy(optical_flow_tvl1(nb, na))[None].float()
            from_a = warp(a[i][None, None], 0.5 * flow_ba)
            from_b = warp(b[i][None, None], 0.5 * flow_ab)
            out[i] = 0.5 * (from_a + from_b)[0, 0]
        return out.reshape(gaps, phases, x, y).to(left.dtype)

    def describe(self):
        return {"method": self.name}

    def close(self):
        pass


def _percentile_normalised(image, lower=1, upper=99):
    lo, hi = np.percentile(image, [lower, upper])
    return np.clip((image - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32)


def make_predictors(
    stack,
    model=None,
    steps=1,
    seed=0,
    device="cpu",
    chunk_size=8,
    baselines=True,
    fallback=True,
    reference=False,
    adapt=0,
    leave_one_out=False,
    phase_fusion=0.0,
):
    """linear and flow (and the TV-L1 ``reference``); with a loaded CaLIDModel also the VAE-only
    baselines (linear and slerp of the neighbours' latents, ``baselines``), CaLID (seeded noise)
    and CaLID+ (``--refine``), and with ``adapt`` steps CaLID adapted to ``stack`` (for
    ``leave_one_out``, per parity: :class:`bundle.adapt.LeaveOneOutAdapted`; fused too with
    ``phase_fusion``). ``fallback=False``
    uses the model at every gap, ignoring its ``fallback_below_mm`` (below it: flow). With a
    ``phase_fusion`` fraction, flow and CaLID also fused over the phases within it
    (:mod:`bundle.temporal`): flow-phases, calid-phases."""
    flow = FlowMidpoints(device=device)
    predictors = {"linear": linear_midpoints, "flow": flow}
    if phase_fusion:  # over the plain predictor itself, so that leave_one_out fuses its predictions
        predictors["flow-phases"] = PhaseFusion(flow, phase_fusion, device=device)
    if reference:
        predictors["tvl1"] = TVL1Reference()
    if model is not None:
        from .inference import LearnedMidpoints

        pre = model.preprocessor(stack)
        common = dict(seed=seed, chunk_size=chunk_size, device=device, fallback=flow if fallback else False)
        if baselines:
            for how in ("linear", "slerp"):
                predictors[f"latent-{how}"] = LearnedMidpoints(model, pre, latent_blend=how, **common)
        predictors["calid"] = LearnedMidpoints(model, pre, num_steps=steps, **common)
        if phase_fusion:
            predictors["calid-phases"] = PhaseFusion(predictors["calid"], phase_fusion, device=device)
        predictors["calid+"] = LearnedMidpoints(model, pre, num_steps=steps, refine=True, **common)
        if adapt:
            from .adapt import LeaveOneOutAdapted, adapt_model

            def make(adapted):
                return LearnedMidpoints(adapted, pre, num_steps=steps, **common)

            predictors["calid adapted"] = (
                LeaveOneOutAdapted(stack, model, adapt, make, device, seed)
                if leave_one_out
                else make(adapt_model(model, stack, adapt, device, seed))
            )
            if phase_fusion:
                predictors["calid adapted-phases"] = PhaseFusion(
                    predictors["calid adapted"], phase_fusion, device=device
                )
    return predictors


def _downstream(segmenter, study, stack, predictions, device):
    from .downstream import contour_labels, segmentation_scores

    labels = contour_labels(study, stack)
    if not labels:
        return None
    inner = [(k, t) for k in range(1, stack.shape[2] - 1) for t in range(stack.shape[3])]
    slices = {"acquired": {(k, t): stack.array[:, :, k, t] for k, t in inner}}
    for name, pred in predictions.items():
        slices[name] = {(k + 1, t): pred[k, t] for k in range(pred.shape[0]) for t in range(pred.shape[1])}
    return segmentation_scores(segmenter, stack, labels, slices, stack.pixel_spacing, device)


def _train_segmenter(studies, iterations, seed, device, out_dir):
    from .downstream import segmentation_examples, train_segmenter

    images, targets = segmentation_examples([(Path(s), read_sax(dicom_folder(s))) for s in studies])
    net = train_segmenter(images, targets, iterations=iterations, seed=seed, device=device)
    torch.save(net.state_dict(), Path(out_dir) / "segmenter.pt")
    return net, {"studies": [Path(s).name for s in studies], "slices": len(images), "iterations": int(iterations)}


def evaluate(
    out_dir,
    studies=(),
    phantom=None,
    weights=None,
    steps=1,
    seed=0,
    device="cpu",
    sweep_steps=(1, 2, 4, 8, 16, 32),
    sweep_phases=4,
    segment_train=(),
    segment_iterations=600,
    alexnet_weights=None,
    overwrite=False,
    fallback=True,
    perceptual=True,
    reference=True,
    labelled_stacks=None,
    heart_mm=HEART_MM,
    phases=None,
    adapt=0,
    phase_fusion=DEFAULT_FRACTION,
):
    """Evaluate every method against the truth: real studies, labelled stacks, phantoms.

    Compares linear interpolation, flow midpoints and the TV-L1 reference, and with weights the
    VAE-only latent baselines, CaLID and CaLID+. Writes OUT_DIR/report.json, report.md,
    figures/STUDY.png (and segmenter.pt); returns the report. The module docstring has the protocol.

    Args:
        out_dir: the folder for the report (refused if it holds one, unless overwrite).
        studies: real studies for leave-one-out (folders with dicom/ and, for the heart region,
            Sunnybrook contours/), every phase.
        phantom: a `calid phantom` folder: x4 against its dense truth, per bisection level.
        weights: a model folder (model.pt, model.json): adds the latent baselines, CaLID and CaLID+.
        steps: DDIM steps of CaLID and CaLID+.
        seed: the seed of the learned model's starting noise.
        device: cpu, cuda or auto.
        sweep_steps: the DDIM steps of the steps sweep (on the first study).
        sweep_phases: how many phases the steps sweep uses.
        segment_train: studies whose contours train a U-Net that then segments every contoured
            leave-one-out slice (Dice, ASD); empty: no downstream check.
        segment_iterations: training iterations of that U-Net.
        alexnet_weights: a local AlexNet weights file for LPIPS and rFID (never downloaded).
        overwrite: replace an existing report.
        fallback: use flow where the model's fallback_below_mm says (false: the model at every gap).
        perceptual: compute LPIPS and rFID (slow on a CPU).
        reference: add the TV-L1 reference (scikit-image, slow).
        labelled_stacks: a folder of NAME.nii.gz with NAME_labels.nii.gz (the Sunnybrook ED/ES
            layout): leave-one-out on each, every slice normalised on its own.
        heart_mm: the side of the heart-region square around the LV centre (mm).
        phases: how many phases of each real study to use, evenly spread (default: every phase).
        adapt: with weights over flow, also CaLID adapted for this many steps to each input
            (leave-one-out: to the slices of the other parity only; never to a scored slice).
        phase_fusion: also flow and CaLID fused over the phases within this fraction of the cycle
            (flow-phases, calid-phases, as `calid upsample --phase-fusion`; where it does not fuse,
            gaps under 16 mm or too few phases, they equal flow and CaLID); 0: left out.
    """
    from .metrics import PerceptualMetrics
    from .phantom import LABELS_SUFFIX, TRUTH_SUFFIX
    from .preview import save_evaluation_figure
    from .studies import list_studies, lv_centre_from_contours, per_slice_normalised_stack, study_name
    from .weights import load_model

    def as_list(value):  # the command line gives one study as a string
        return [value] if isinstance(value, (str, int, Path)) else list(value or ())

    studies, sweep_steps, segment_train = as_list(studies), as_list(sweep_steps), as_list(segment_train)
    heart_mm = float(heart_mm)
    overwrite, fallback = as_flag(overwrite, "overwrite"), as_flag(fallback, "fallback")
    perceptual, reference = as_flag(perceptual, "perceptual"), as_flag(reference, "reference")
    out_dir = Path(out_dir)
    if (out_dir / "report.json").exists() and not overwrite:
        raise InputRefused(f"{out_dir} holds a report already; choose another folder or pass --overwrite")
    model = load_model(weights, device=device) if weights else None  # once, for every study
    adapt, phase_fusion = _whole(adapt, "adapt", 0), _fraction(phase_fusion, "phase fusion")
    if adapt:
        from .adapt import check_adaptable

        if model is None:
            raise InputRefused("adapt needs weights (a model over flow to adapt)")
        check_adaptable(model)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once every refusal has had its say
    perceptual = PerceptualMetrics(alexnet_weights, device=device) if perceptual else None
    report = {
        "protocol": __doc__.strip(),
        "steps": steps,
        "heart_mm": float(heart_mm),
        "weights": str(weights),
        "trained_on": model.info.trained_on if model else None,
        # gaps narrower than this (mm) are filled by flow midpoints in CaLID (unless fallback=False)
        "fallback_below_mm": model.info.fallback_below_mm if model and fallback else None,
        "adapt_steps": adapt,
        "phase_fusion": phase_fusion,
        "skipped": dict(perceptual.skipped) if perceptual else {"lpips": "not asked for", "rfid": "not asked for"},
        "real": {},
        "sweep": {},
        "downstream": {},
        "phantom": {},
        "labelled_stacks": {},
    }

    def leave_one_out_predictors(stack):
        return make_predictors(
            stack, model, steps, seed, device, fallback=fallback, reference=reference, adapt=adapt, leave_one_out=True,
            phase_fusion=phase_fusion,
        )  # fmt: skip

    segmenter = None
    if segment_train:
        segmenter, report["segmenter"] = _train_segmenter(segment_train, segment_iterations, seed, device, out_dir)
    for study in studies:
        study = Path(study)
        logger.info("leave-one-out on %s", study.name)
        stack = read_sax(dicom_folder(study))
        if phases:
            x, y, _, count = stack.shape
            kept = evenly_spread(count, phases)
            stack = crop_inplane(stack, 0, x, 0, y, phases=kept)
            report.setdefault("phases", {})[study.name] = kept
        centre = lv_centre_from_contours(study)
        report["real"][study.name], predictions = leave_one_out(
            stack, leave_one_out_predictors(stack), centre, perceptual=perceptual, heart_mm=heart_mm
        )
        box = heart_box(stack, centre, heart_mm)
        save_evaluation_figure(stack, predictions, box, out_dir / "figures" / f"{study.name}.png")
        if model is not None and sweep_steps:
            sweep_at = evenly_spread(stack.shape[3], sweep_phases)
            report["sweep"][study.name] = steps_sweep(
                stack, model, sweep_steps, centre, sweep_at, seed, device, fallback
            )
            report["sweep_phases"] = sweep_at
        if segmenter is not None:
            report["downstream"][study.name] = _downstream(segmenter, study, stack, predictions, device)
    if phantom:
        for path in list_studies(phantom):
            name = study_name(path)
            logger.info("x4 on phantom %s", name)
            sparse = read_sax(path)
            truth = read_sax(Path(phantom) / f"{name}{TRUTH_SUFFIX}.nii.gz")
            labels = read_sax(Path(phantom) / f"{name}{LABELS_SUFFIX}.nii.gz")
            predictors = make_predictors(
                sparse, model, steps, seed, device, fallback=fallback, reference=reference, adapt=adapt,
                phase_fusion=phase_fusion,
            )  # fmt: skip
            report["phantom"][name] = phantom_per_level(sparse, truth, labels, predictors, heart_mm=heart_mm)
    for path in sorted(Path(labelled_stacks).glob("*.nii.gz")) if labelled_stacks else ():
        if path.name.endswith(f"{LABELS_SUFFIX}.nii.gz"):
            continue
        logger.info("leave-one-out on %s", path.name)
        stack, centre = per_slice_normalised_stack(path)
        report["labelled_stacks"][path.name[: -len(".nii.gz")]] = leave_one_out(
            stack, leave_one_out_predictors(stack), centre, heart_mm=heart_mm
        )[0]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(report_markdown(report))
    return report
