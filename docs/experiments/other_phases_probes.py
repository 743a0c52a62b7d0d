"""Three ways of using the cine's other phases beyond uniform fusion, probed on the training
studies (leave-one-out x2: every inner slice predicted by the flow midpoint of its neighbours two
acquisitions apart, every phase; PSNR gain over that midpoint in the 80 mm heart square, the
study scaled to its robust [0, 1] range). None was built; docs/README.md, "Fusion over phases" and
"Round 8".

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

Prints JSON lines (through-plane: one per inner slice, then the study's mean).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bundle.evaluate import heart_box
from bundle.io import read_sax
from bundle.motion import FlowMidpoints, _gaussian_blur
from bundle.studies import dicom_folder, lv_centre_from_contours
from bundle.temporal import fuse_phases, register_onto, registered_phases
from bundle.transforms import IntensityScaler


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
    parser.add_argument("probe", choices=("weighted", "denoised-neighbours", "through-plane"))
    parser.add_argument("studies", nargs="+", type=Path)
    args = parser.parse_args()
    for study in args.studies:
        stack = read_sax(dicom_folder(study))
        box = heart_box(stack, lv_centre_from_contours(study))
        scaler = IntensityScaler.fit(stack.array)
        slices = torch.from_numpy(np.ascontiguousarray(scaler(stack.array).transpose(2, 3, 0, 1), dtype=np.float32))
        if args.probe == "weighted":
            result = weighted(slices, box)
        elif args.probe == "denoised-neighbours":
            result = denoised_neighbours(slices, box)
        else:
            result = through_plane(slices, box, study.name)
        print(json.dumps({"study": study.name, "phases": slices.shape[1], **result}), flush=True)


if __name__ == "__main__":
    main()
