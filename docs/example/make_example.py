"""Make the shipped example: SCD0000301 (a Sunnybrook training patient, CC0) cropped to
96 x 96 pixels around the LV (centre of its endocardial contours), all slices, every
other phase (10 of 20), to stay well under 2 MB.

    python docs/example/make_example.py ../shared/data/sunnybrook-scd/SCD0000301 docs/example/SCD0000301_heart.nii.gz

Optional third and fourth arguments change the half-width of the crop (default 48 pixels) and
the phase step (default 2), e.g. ``... 64 1`` for 128 x 128 crops with all phases.
"""

import sys
from pathlib import Path

import numpy as np

from bundle.io import read_sax, write_nifti
from bundle.stack import crop_inplane
from bundle.studies import lv_centre_from_contours

HALF = 48


def main(study, output, half=HALF, phase_step=2):
    study, half, phase_step = Path(study), int(half), int(phase_step)
    stack = read_sax(study / "dicom")
    cx, cy = np.round(lv_centre_from_contours(study)).astype(int)
    x0, y0 = max(0, cx - half), max(0, cy - half)
    phases = list(range(0, stack.shape[3], phase_step))
    example = crop_inplane(stack, x0, x0 + 2 * half, y0, y0 + 2 * half, phases=phases)
    step = "even phases" if phase_step == 2 else f"phase step {phase_step}"
    example.meta["descrip"] = f"{study.name} (Sunnybrook, CC0) crop x{x0}:{x0 + 2 * half} y{y0}:{y0 + 2 * half} {step}"
    write_nifti(example, output, overwrite=True, dtype=np.int16)
    print(f"wrote {output}: shape {example.shape}, crop x {x0}:{x0 + 2 * half}, y {y0}:{y0 + 2 * half}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
