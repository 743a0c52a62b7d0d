"""The evaluation report as Markdown tables (``report.md``), from the report dict that
:func:`bundle.evaluate.evaluate` also writes as ``report.json``."""

from __future__ import annotations

import numpy as np


def report_markdown(report) -> str:
    """``report.md`` of :func:`bundle.evaluate.evaluate`: its tables, from ``report.json``'s contents."""
    trained = report.get("trained_on") or []
    lines = [
        "# Evaluation against linear interpolation and flow midpoints",
        "",
        f"DDIM steps: {report['steps']}; weights: {report['weights']}; trained on: {', '.join(trained) or 'unknown'}",
        f"CaLID falls back to flow between neighbours closer than: {report.get('fallback_below_mm') or 'never'} mm",
        "",
        "Intensities scaled by each study's 0.5-99.5 percentile range to [0, 1]; heart region: a "
        f"{report['heart_mm']:.0f} mm square around the LV centre. LPIPS and rFID on the whole slice.",
    ]
    lines += [f"- {metric} skipped: {why}" for metric, why in report.get("skipped", {}).items()]
    header = (
        "| study | method | PSNR | SSIM | PSNR heart | SSIM heart | gain heart (dB) | gain SSIM heart "
        "| gain heart over flow (dB) |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|"
    if report["real"]:
        lines += ["", "## Real studies, leave-one-out (neighbours two acquisitions apart), all phases", ""]
        lines += [header + " LPIPS | rFID | s/slice |", rule + "---|---|---|"]
        for study, methods in report["real"].items():
            label = f"{study} ({'in-sample' if study in trained else 'held out'})" if trained else study
            for method, s in methods.items():
                extra = [_fmt(s.get("lpips"), 4), _fmt(s.get("rfid"), 1), _fmt(s.get("seconds_per_slice"), 3)]
                lines.append(_row(label, method, s, methods) + " " + " | ".join(extra) + " |")
    for study, sweep in report.get("sweep", {}).items():
        lines += ["", f"## DDIM steps, {study} (phases {report.get('sweep_phases')})", ""]
        lines += ["| method | steps | PSNR heart | SSIM heart | s/slice |", "|---|---|---|---|---|"]
        for method, by_steps in sweep.items():
            for steps, s in by_steps.items():
                lines.append(
                    f"| {method} | {steps} | {s['psnr_heart']:.2f} | {s['ssim_heart']:.4f} | "
                    f"{s['seconds_per_slice']:.3f} |"
                )
    for study, methods in report.get("downstream", {}).items():
        if not methods:
            continue
        seg = report.get("segmenter", {})
        lines += [
            "",
            f"## Downstream segmentation, {study} (U-Net trained on {', '.join(seg.get('studies', []))}, "
            f"{seg.get('slices')} slices, {seg.get('iterations')} iterations)",
            "",
            "| segmented slice | class | Dice | ASD (mm) | slices | no surface |",
            "|---|---|---|---|---|---|",
        ]
        for method, classes in methods.items():
            for cname, c in classes.items():
                lines.append(
                    f"| {method} | {cname} | {_fmt(c['dice'], 3)} | {_fmt(c['asd_mm'], 2)} | {c['n']} | {c['failed']} |"
                )
    if report.get("labelled_stacks"):
        stacks = report["labelled_stacks"]
        lines += [
            "",
            f"## Labelled stacks (each slice normalised on its own), leave-one-out: mean over {len(stacks)} stacks",
            "",
            header.replace("study", "stacks"),
            rule,
        ]
        first = next(iter(stacks.values()))
        names = list(first)
        mean = {  # of the scores; not of what varies in shape (per-slice lists, adaptation records)
            m: {k: float(np.mean([v[m][k] for v in stacks.values()])) for k, x in first[m].items() if _number(x)}
            for m in names
        }
        for method in names:
            lines.append(_row(len(stacks), method, mean[method], mean))
        wins = {m: sum(v[m]["psnr_heart"] > v["linear"]["psnr_heart"] for v in stacks.values()) for m in names}
        lines += ["", "Stacks where the method beats linear in the heart region: " + ", ".join(
            f"{m} {wins[m]}/{len(stacks)}" for m in names if m != "linear")]  # fmt: skip
    for name, methods in report["phantom"].items():
        lines += ["", f"## Phantom {name}, x4 against the dense truth", "", header.replace("study", "level"), rule]
        for level in methods["linear"]:
            for method in methods:
                lines.append(_row(level, method, methods[method][level], {k: v[level] for k, v in methods.items()}))
    lines += _adaptation_lines(report)
    return "\n".join(lines) + "\n"


def _adaptation_lines(report):
    """What adapting cost, per input (``evaluate --adapt``): steps, triplets, seconds."""
    rows = []
    for part in ("real", "labelled_stacks", "phantom"):
        for name, methods in report.get(part, {}).items():
            for method, s in methods.items():
                runs = s.get("adaptation") or []
                for run in runs if isinstance(runs, list) else [runs]:
                    rows.append(f"| {name} | {method} | {run['steps']} | {run['triplets']} | {run['seconds']:.1f} |")
    if not rows:
        return []
    return [
        "",
        "## Adaptation to each input (leave-one-out: one run per parity)",
        "",
        "| input | method | steps | triplets | seconds |",
        "|---|---|---|---|---|",
    ] + rows


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value, digits):
    return "skipped" if value is None else f"{value:.{digits}f}"


def _row(label, method, s, all_methods):
    """One table row; gains over linear and over flow (when the report has flow)."""
    base, flow = all_methods["linear"], all_methods.get("flow")
    over_flow = "" if flow is None else f"{s['psnr_heart'] - flow['psnr_heart']:+.2f}"
    return (
        f"| {label} | {method} | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['psnr_heart']:.2f} | "
        f"{s['ssim_heart']:.4f} | {s['psnr_heart'] - base['psnr_heart']:+.2f} | "
        f"{s['ssim_heart'] - base['ssim_heart']:+.4f} | {over_flow} |"
    )
