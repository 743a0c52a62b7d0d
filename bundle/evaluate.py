"""Evaluation against fixed interpolation, on data with a known answer.

- Real studies, the paper's protocol: every slice with both neighbours acquired is predicted
  from them (neighbours two acquisitions apart), every phase, and compared with the acquired
  slice.
- Phantom subjects: x4 from the sparse stack, compared with the dense truth at every generated
  position, per bisection level (level 1: neighbours 8 mm apart for an 8 mm stack; level 2: 4 mm).

Intensities are scaled by each study's robust range (0.5-99.5 percentiles to 0-1) before
PSNR/SSIM; the heart region is a square of ``heart_mm`` around the LV centre (from the
Sunnybrook contours or the phantom's labels, else the image centre).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .io import read_sax
from .metrics import psnr, ssim
from .transforms import IntensityScaler
from .upsample import linear_midpoints, upsample_stack

HEART_MM = 80.0


def heart_box(stack, centre_xy=None, heart_mm=HEART_MM):
    """(x0, x1, y0, y1): a square of ``heart_mm`` around ``centre_xy`` (pixels), inside the image."""
    x, y = stack.shape[:2]
    half = [max(4, int(round(heart_mm / 2 / s))) for s in stack.pixel_spacing]
    cx, cy = centre_xy if centre_xy is not None else (x / 2, y / 2)
    x0 = int(np.clip(round(cx) - half[0], 0, max(0, x - 2 * half[0])))
    y0 = int(np.clip(round(cy) - half[1], 0, max(0, y - 2 * half[1])))
    return x0, min(x, x0 + 2 * half[0]), y0, min(y, y0 + 2 * half[1])


def lv_centre_from_contours(study_dir):
    """Mean of the Sunnybrook endocardial contour points, (column, row) = (x, y); None if absent."""
    files = sorted(Path(study_dir).glob("contours/i-contours/*.txt"))
    if not files:
        return None
    return tuple(np.concatenate([np.loadtxt(f) for f in files]).mean(axis=0))


def scores(pred, truth, box):
    """Mean PSNR/SSIM over slices (N, X, Y), whole slice and heart box (network scale)."""
    p, t = torch.as_tensor(pred, dtype=torch.float32)[:, None], torch.as_tensor(truth, dtype=torch.float32)[:, None]
    x0, x1, y0, y1 = box
    ph, th = p[..., x0:x1, y0:y1], t[..., x0:x1, y0:y1]
    return {
        "psnr": float(psnr(p, t).mean()),
        "ssim": float(ssim(p, t).mean()),
        "psnr_heart": float(psnr(ph, th).mean()),
        "ssim_heart": float(ssim(ph, th).mean()),
    }


def leave_one_out(stack, predictors: dict, centre_xy=None):
    """Predict every inner slice from its acquired neighbours with each predictor; scores per method."""
    scaler = IntensityScaler.fit(stack.array)
    slices = torch.from_numpy(np.ascontiguousarray(stack.array.transpose(2, 3, 0, 1), dtype=np.float64))
    truth = slices[1:-1]
    box = heart_box(stack, centre_xy)
    result = {}
    for name, predictor in predictors.items():
        pred = predictor(slices[:-2], slices[2:], 0)
        result[name] = scores(scaler(pred.flatten(0, 1).numpy()), scaler(truth.flatten(0, 1).numpy()), box)
    return result


def phantom_per_level(sparse, truth, labels, predictors: dict, factor=4):
    """x``factor`` against the dense truth, scores per bisection level and over all new slices."""
    step = (truth.shape[2] - 1) // ((sparse.shape[2] - 1) * factor)
    target = truth.array[:, :, ::step].astype(np.float64)
    scaler = IntensityScaler.fit(sparse.array)
    lv = np.argwhere(labels.array[:, :, :, 0] == 1)
    box = heart_box(sparse, lv[:, :2].mean(0) if len(lv) else None)
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
    return result


def make_predictors(stack, model=None, steps=1, seed=0, device="cpu", chunk_size=8):
    """linear, and with a loaded CaLIDModel CaLID (seeded noise) and CaLID+ (--refine)."""
    predictors = {"linear": linear_midpoints}
    if model is not None:
        from .inference import LearnedMidpoints
        from .transforms import SlicePreprocessor

        pre = SlicePreprocessor.for_stack(stack, model.model_spacing, model.size_multiple)
        for name, refine in (("calid", False), ("calid+", True)):
            predictors[name] = LearnedMidpoints(
                model, pre, num_steps=steps, refine=refine, seed=seed, chunk_size=chunk_size, device=device
            )
    return predictors


def evaluate(out_dir, studies=(), phantom_dir=None, weights_dir=None, steps=1, seed=0, device="cpu"):
    """Write ``report.json`` and ``report.md`` under ``out_dir``; returns the report."""
    from .data import list_studies, study_name
    from .inference import load_model
    from .phantom import LABELS_SUFFIX, TRUTH_SUFFIX

    model = load_model(weights_dir, device=device) if weights_dir else None  # once, for every study
    report = {"protocol": __doc__.strip(), "steps": steps, "weights": str(weights_dir), "real": {}, "phantom": {}}
    for study in studies:
        study = Path(study)
        dicom = study / "dicom" if (study / "dicom").is_dir() else study
        stack = read_sax(dicom)
        predictors = make_predictors(stack, model, steps, seed, device)
        report["real"][study.name] = leave_one_out(stack, predictors, lv_centre_from_contours(study))
    if phantom_dir:
        for path in list_studies(phantom_dir):
            name = study_name(path)
            sparse = read_sax(path)
            truth = read_sax(Path(phantom_dir) / f"{name}{TRUTH_SUFFIX}.nii.gz")
            labels = read_sax(Path(phantom_dir) / f"{name}{LABELS_SUFFIX}.nii.gz")
            predictors = make_predictors(sparse, model, steps, seed, device)
            report["phantom"][name] = phantom_per_level(sparse, truth, labels, predictors)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(markdown(report))
    return report


def markdown(report):
    lines = [
        "# Evaluation against linear interpolation",
        "",
        f"DDIM steps: {report['steps']}; weights: {report['weights']}",
        "",
    ]
    header = "| study | method | PSNR | SSIM | PSNR heart | SSIM heart | gain heart (dB) |"
    rule = "|---|---|---|---|---|---|---|"
    if report["real"]:
        lines += ["## Real studies, leave-one-out (neighbours two acquisitions apart)", "", header, rule]
        for study, methods in report["real"].items():
            base = methods["linear"]["psnr_heart"]
            for method, s in methods.items():
                lines.append(_row(study, method, s, base))
    for name, methods in report["phantom"].items():
        lines += ["", f"## Phantom {name}, x4 against the dense truth", "", header.replace("study", "level"), rule]
        for level in methods["linear"]:
            base = methods["linear"][level]["psnr_heart"]
            for method in methods:
                lines.append(_row(level, method, methods[method][level], base))
    return "\n".join(lines) + "\n"


def _row(label, method, s, base):
    return (
        f"| {label} | {method} | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['psnr_heart']:.2f} | "
        f"{s['ssim_heart']:.4f} | {s['psnr_heart'] - base:+.2f} |"
    )
