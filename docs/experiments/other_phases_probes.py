"""Training-free ways of using more than the two neighbours at one phase (the cine's other phases,
the slices further out), probed on the training studies (leave-one-out x2: every inner slice
predicted by the flow midpoint of its neighbours two acquisitions apart, every phase; PSNR gain
over that midpoint in the 80 mm heart square, the study scaled to its robust [0, 1] range). None
was built; docs/README.md, "Fusion over phases", "Round 8" and "Round 10".

``weighted``: fusion over phases (bundle.temporal) with each registered copy weighted per pixel by
exp(-d / h^2), d its squared difference from the phase's own midpoint blurred over ``sigma``
pixels (a temporal non-local mean), against the uniform average, windows 1-5 each side:

    OMP_NUM_THREADS=2 python docs/experiments/other_phases_probes.py weighted ../shared/data/sunnybrook-scd/SCD0000101

``denoised-neighbours``: the acquired neighbours first fused over their own cine's phases (the same
registered average, 1 or 3 phases each side), then the flow midpoint of those calmer neighbours,
alone and fused over phases as the default fuses it (3 each side), against the plain and the
default fused flow midpoint (0.9.2):

    OMP_NUM_THREADS=2 python docs/experiments/other_phases_probes.py denoised-neighbours \
        ../shared/data/sunnybrook-scd/SCD0000101 ../shared/data/sunnybrook-scd/SCD0000201 \
        ../shared/data/sunnybrook-scd/SCD0000301

``through-plane``: the base of the heart moves toward the apex in systole, so an acquired
neighbour at another phase may show the anatomy between the two neighbours at this one. Every
acquired neighbour at every other phase registered onto the midpoint: the best of them per slice
(an oracle, chosen with the truth), the one closest to the midpoint, and blends of the midpoint
with the 1, 3 and 6 closest:

    OMP_NUM_THREADS=2 python docs/experiments/other_phases_probes.py through-plane \
        ../shared/data/sunnybrook-scd/SCD0000101

``neighbour-motion``: fusion over phases (3 each side) with each copy registered onto the phase's
midpoint by another flow: its own (the default), the mean of the flows that register the two
acquired neighbours' phases onto theirs (they are images, not predictions, so their flow cannot
align a prediction's errors), and the mean of the two; of the flow midpoints, or with ``--weights``
of CaLID's (1 DDIM step from the mean start, as shipped), still against the plain flow midpoint
(0.9.4):

    OMP_NUM_THREADS=2 python docs/experiments/other_phases_probes.py neighbour-motion \
        ../shared/data/sunnybrook-scd/SCD0000101 ../shared/data/sunnybrook-scd/SCD0000201 \
        ../shared/data/sunnybrook-scd/SCD0000301 [--weights models]

``outer-slices``: a four-slice midpoint, as cubic interpolation takes one, in motion-compensated
form: m + a (m - o), m the flow midpoint of the neighbours, o that of the slices three
acquisitions out, registered onto m or not; at the inner slices that have both (0.9.4):

    OMP_NUM_THREADS=2 python docs/experiments/other_phases_probes.py outer-slices \
        ../shared/data/sunnybrook-scd/SCD0000101 ../shared/data/sunnybrook-scd/SCD0000201 \
        ../shared/data/sunnybrook-scd/SCD0000301

Prints JSON lines (through-plane: one per inner slice, then the study's mean).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bundle.evaluate import heart_box
from bundle.inference import LearnedMidpoints
from bundle.io import read_sax
from bundle.motion import FlowMidpoints, _gaussian_blur, midpoint_flow, pairs_per_chunk, warp
from bundle.studies import dicom_folder, lv_centre_from_contours
from bundle.temporal import fuse_phases, register_onto, registered_phases
from bundle.transforms import IntensityScaler
from bundle.upsample import linear_midpoints
from bundle.weights import load_model


def heart_psnr(pred, truth, box):
    """PSNR over the last two axes' ``box``, per leading index."""
    x0, x1, y0, y1 = box
    return -10 * torch.log10(((pred - truth) ** 2)[..., x0:x1, y0:y1].mean((-1, -2)))


def weighted(slices, box, windows=5):
    """slices (Z, T, X, Y) scaled: gains of uniform (u{w}) and weighted (w{w}_h{h}_s{sigma}) fusion."""
    truth = slices[1:-1]
    mid = FlowMidpoints()(slices[:-2], slices[2:]).float()
    n, t, x, y = mid.shape
    windows = min(windows, (t - 1) // 2)
    registered = dict(registered_phases(mid, windows))
    base = float(heart_psnr(mid, truth, box).mean())
    result = {}
    for window in range(1, windows + 1):
        shifts = [s for k in range(1, window + 1) for s in (k, -k)]
        uniform = (mid + sum(registered[s] for s in shifts)) / (2 * window + 1)
        result[f"u{window}"] = float(heart_psnr(uniform, truth, box).mean()) - base
        for h in (0.03, 0.06, 0.12):
            for sigma in (1.5, 3.0):
                total, weight = mid.clone(), torch.ones_like(mid)
                for s in shifts:
                    d = _gaussian_blur(((registered[s] - mid) ** 2).reshape(n * t, 1, x, y), sigma)
                    w = torch.exp(-d.reshape(n, t, x, y) / h**2)
                    total += w * registered[s]
                    weight += w
                result[f"w{window}_h{h}_s{sigma}"] = float(heart_psnr(total / weight, truth, box).mean()) - base
    return result


def denoised_neighbours(slices, box, window=3):
    """Gains over the flow midpoint of: the midpoint fused over ``window`` phases each side (the
    default, f{window}); the midpoint of neighbours first fused over their own cine's phases
    (d{w}, w = 1 and 3 each side), and that midpoint fused as well (d{w}_f{window})."""
    truth = slices[1:-1]
    mid = FlowMidpoints()(slices[:-2], slices[2:]).float()
    base = float(heart_psnr(mid, truth, box).mean())

    def gain(pred):
        return float(heart_psnr(pred, truth, box).mean()) - base

    result = {f"f{window}": gain(fuse_phases(mid, window))}
    for w in (1, 3):
        calm = fuse_phases(slices, w)
        calm_mid = FlowMidpoints()(calm[:-2], calm[2:]).float()
        result[f"d{w}"], result[f"d{w}_f{window}"] = gain(calm_mid), gain(fuse_phases(calm_mid, window))
    return result


def flows_between(fixed, moving):
    """The flows (N, 2, X, Y) that register ``moving`` onto ``fixed`` (N, X, Y), as
    bundle.temporal.register_onto takes them, in chunks of 256 MB."""
    chunk = pairs_per_chunk(*fixed.shape[-2:], 256)
    a, b = fixed[:, None].float(), moving[:, None].float()
    return torch.cat([midpoint_flow(a[i : i + chunk], b[i : i + chunk]) for i in range(0, len(a), chunk)])


def neighbour_motion(slices, box, window=3, midpoints=None):
    """The flow midpoint's heart PSNR, and gains over it of linear interpolation, of ``midpoints``
    (default: that flow midpoint; unfused) and of them fused over ``window`` phases each side,
    each copy registered by its own flow (own: the default), the neighbours' mean flow
    (neighbours), or the mean of those two flows (both)."""
    truth = slices[1:-1]
    flow = FlowMidpoints()(slices[:-2], slices[2:]).float()
    mid = flow if midpoints is None else midpoints.float()
    n, t, x, y = mid.shape
    totals = {key: mid.clone() for key in ("own", "neighbours", "both")}
    for shift in [s for k in range(1, window + 1) for s in (k, -k)]:
        moving = mid.roll(-shift, dims=1).reshape(n * t, 1, x, y)  # phase t + shift
        own = flows_between(mid.reshape(n * t, x, y), moving[:, 0])
        acquired = flows_between(slices.flatten(0, 1), slices.roll(-shift, dims=1).flatten(0, 1))
        acquired = acquired.reshape(n + 2, t, 2, x, y)
        neighbours = (0.5 * (acquired[:-2] + acquired[2:])).reshape(n * t, 2, x, y)
        for key, field in (("own", own), ("neighbours", neighbours), ("both", 0.5 * (own + neighbours))):
            totals[key] += warp(moving, field).reshape(n, t, x, y)
    base = heart_psnr(flow, truth, box).mean()
    linear = linear_midpoints(slices[:-2], slices[2:])
    result = {"flow_psnr": float(base), "linear": float(heart_psnr(linear, truth, box).mean() - base)}
    result["unfused"] = float(heart_psnr(mid, truth, box).mean() - base)
    result.update(
        {key: float(heart_psnr(total / (2 * window + 1), truth, box).mean() - base) for key, total in totals.items()}
    )
    return result


def outer_slices(slices, box):
    """Gains over the flow midpoint m of m + a (m - o) at the inner slices with neighbours three
    acquisitions out, o their flow midpoint registered onto m (reg{a}) or not (plain{a})."""
    z, t, x, y = slices.shape
    inner = list(range(3, z - 3))
    truth = slices[inner]
    mid = FlowMidpoints()(slices[[k - 1 for k in inner]], slices[[k + 1 for k in inner]]).float()
    outer = FlowMidpoints()(slices[[k - 3 for k in inner]], slices[[k + 3 for k in inner]]).float()
    flat = outer.reshape(-1, 1, x, y)
    registered = warp(flat, flows_between(mid.reshape(-1, x, y), flat[:, 0])).reshape(mid.shape)
    base = heart_psnr(mid, truth, box).mean()
    result = {"inner_slices": inner}
    for a in (1 / 16, 1 / 8, 1 / 4):
        for key, o in (("reg", registered), ("plain", outer)):
            result[f"{key}{a:g}"] = float(heart_psnr(mid + a * (mid - o), truth, box).mean() - base)
    return result


def through_plane(slices, box, name):
    """Per inner slice k: mean gains over the flow midpoint of the candidates described above."""
    z, t = slices.shape[:2]
    mid = FlowMidpoints()(slices[:-2], slices[2:]).float()
    x0, x1, y0, y1 = box
    keys = ("best", "closest", "blend1", "blend3", "blend6")
    rows = []
    for k in range(1, z - 1):
        m, truth = mid[k - 1], slices[k]
        candidates = torch.stack(
            [
                register_onto(m[:, None], slices[side].roll(-dt, dims=0)[:, None])[:, 0]  # phase t + dt
                for side in (k - 1, k + 1)
                for dt in range(1, t)
            ],
            1,
        )  # (T, candidates, X, Y)
        base = heart_psnr(m, truth, box)
        for phase in range(t):
            gains = heart_psnr(candidates[phase], truth[phase], box) - base[phase]
            distance = ((candidates[phase] - m[phase]) ** 2)[:, x0:x1, y0:y1].mean((1, 2))
            order = torch.argsort(distance)
            row = {"best": float(gains.max()), "closest": float(gains[order[0]])}
            for count in (1, 3, 6):
                blend = (m[phase] + candidates[phase, order[:count]].sum(0)) / (count + 1)
                row[f"blend{count}"] = float(heart_psnr(blend, truth[phase], box) - base[phase])
            rows.append((k, row))
        mine = [r for i, r in rows if i == k]
        print(json.dumps({"study": name, "k": k, **{key: float(np.mean([r[key] for r in mine])) for key in keys}}))
    return {key: float(np.mean([r[key] for _, r in rows])) for key in keys}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    probes = {"weighted": weighted, "denoised-neighbours": denoised_neighbours}
    probes.update({"neighbour-motion": neighbour_motion, "outer-slices": outer_slices})
    parser.add_argument("probe", choices=(*probes, "through-plane"))
    parser.add_argument("studies", nargs="+", type=Path)
    parser.add_argument("--weights", type=Path, help="neighbour-motion: fuse CaLID's midpoints with these weights")
    args = parser.parse_args()
    if args.weights and args.probe != "neighbour-motion":
        parser.exit(2, f"{parser.prog}: --weights is for neighbour-motion only\n")
    model = load_model(args.weights) if args.weights else None
    for study in args.studies:
        stack = read_sax(dicom_folder(study))
        box = heart_box(stack, lv_centre_from_contours(study))
        scaler = IntensityScaler.fit(stack.array)
        slices = torch.from_numpy(np.ascontiguousarray(scaler(stack.array).transpose(2, 3, 0, 1), dtype=np.float32))
        if args.probe == "through-plane":
            result = through_plane(slices, box, study.name)
        elif model is not None and args.probe == "neighbour-motion":
            raw = torch.from_numpy(np.ascontiguousarray(stack.array.transpose(2, 3, 0, 1), dtype=np.float32))
            learned = LearnedMidpoints(model, model.preprocessor(stack), num_steps=model.info.steps)
            calid = scaler(learned(raw[:-2], raw[2:], 2 * stack.slice_spacing).numpy())
            result = {"weights": str(args.weights), **neighbour_motion(slices, box, midpoints=torch.from_numpy(calid))}
        else:
            result = probes[args.probe](slices, box)
        print(json.dumps({"study": study.name, "phases": slices.shape[1], **result}), flush=True)


if __name__ == "__main__":
    main()
