"""How far fusion over phases reaches, and at which gaps it helps: leave-one-out on real cines
(every slice predicted from its neighbours two acquisitions apart, every phase), the flow
midpoints fused with windows of 1..N phases each side (bundle.temporal.fuse_phases), and x4 on
phantoms with every gap fused (``--phantom``); gain over the flow midpoint in the 80 mm heart
region as `calid evaluate` scores it. The fraction of the cycle and the narrowest gap fused
were chosen with it on the training studies (also every other phase, ``--phase-stride 2``) and
phantoms:

    OMP_NUM_THREADS=2 python docs/experiments/phase_window.py \
        ../shared/data/sunnybrook-scd/SCD0000101 ../shared/data/sunnybrook-scd/SCD0000201 \
        ../shared/data/sunnybrook-scd/SCD0000301 [--phase-stride 2]
    calid phantom eval/phantom_p20 --subjects 3 --seed 2000 --size 128 --slices 11 --phases 20
    OMP_NUM_THREADS=2 python docs/experiments/phase_window.py --phantom eval/phantom_p20

Prints one JSON line per study and window, or per phantom and level.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bundle.evaluate import heart_box, phantom_per_level, scores
from bundle.io import read_sax
from bundle.motion import FlowMidpoints
from bundle.phantom import LABELS_SUFFIX, TRUTH_SUFFIX
from bundle.stack import crop_inplane
from bundle.studies import dicom_folder, list_studies, lv_centre_from_contours, study_name
from bundle.temporal import DEFAULT_FRACTION, PhaseFusion, fuse_phases
from bundle.transforms import IntensityScaler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="*", type=Path)
    parser.add_argument("--phantom", type=Path, help="a `calid phantom` folder: x4 per level, every gap fused")
    parser.add_argument("--fraction", type=float, default=DEFAULT_FRACTION, help="with --phantom")
    parser.add_argument("--windows", type=int, default=4, help="try windows 1 to this")
    parser.add_argument("--phase-stride", type=int, default=1, help="keep every Nth phase (a coarser cine)")
    args = parser.parse_args()
    for study in args.studies:
        stack = read_sax(dicom_folder(study))
        stack = crop_inplane(
            stack, 0, stack.shape[0], 0, stack.shape[1], phases=list(range(0, stack.shape[3], args.phase_stride))
        )
        box = heart_box(stack, lv_centre_from_contours(study))
        scaler = IntensityScaler.fit(stack.array)
        slices = torch.from_numpy(np.ascontiguousarray(stack.array.transpose(2, 3, 0, 1), dtype=np.float32))
        truth = scaler(slices[1:-1].flatten(0, 1).numpy())
        flow = FlowMidpoints()(slices[:-2], slices[2:])
        base = scores(scaler(flow.flatten(0, 1).numpy()), truth, box)
        for window in range(1, args.windows + 1):
            fused = scores(scaler(fuse_phases(flow, window).flatten(0, 1).numpy()), truth, box)
            report = {
                "study": study.name,
                "phases": stack.shape[3],
                "window": window,
                "psnr_gain_db": fused["psnr_heart"] - base["psnr_heart"],
                "ssim_gain": fused["ssim_heart"] - base["ssim_heart"],
            }
            print(json.dumps(report), flush=True)
    for path in list_studies(args.phantom) if args.phantom else ():
        name = study_name(path)
        sparse, truth, labels = (
            read_sax(args.phantom / f"{name}{suffix}.nii.gz") for suffix in ("", TRUTH_SUFFIX, LABELS_SUFFIX)
        )
        fused = PhaseFusion(FlowMidpoints(), args.fraction, from_mm=0)  # the narrowest gap is what this measures
        result = phantom_per_level(sparse, truth, labels, {"flow": FlowMidpoints(), "fused": fused})
        for level in ("level 1", "level 2"):
            base, gain = result["flow"][level], result["fused"][level]
            report = {
                "phantom": name,
                "phases": sparse.shape[3],
                "level": level,
                "gap_mm": sparse.slice_spacing / (1 if level == "level 1" else 2),
                "fraction": args.fraction,
                "psnr_gain_db": gain["psnr_heart"] - base["psnr_heart"],
                "ssim_gain": gain["ssim_heart"] - base["ssim_heart"],
            }
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
