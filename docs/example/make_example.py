"""Make the shipped example: SCD0000301 (a Sunnybrook training patient, CC0) cropped to
96 x 96 pixels around the LV (centre of its endocardial contours), all slices, every
other phase (10 of 20), to stay well under 2 MB.

    python docs/example/make_example.py ../shared/data/sunnybrook-scd/SCD0000301 docs/example/SCD0000301_heart.nii.gz
"""

import sys
from pathlib import Path

import numpy as np

from bundle.io import crop_inplane, read_sax, write_nifti

HALF = 48


def lv_centre(study: Path):
    points = [np.loadtxt(f) for f in sorted((study / "contours" / "i-contours").glob("*.txt"))]
    return np.concatenate(points).mean(axis=0)  # (column, row) = (x, y) of our arrays


def main(study, output):
    study = Path(study)
    stack = read_sax(study / "dicom")
    cx, cy = np.round(lv_centre(study)).astype(int)
    x0, y0 = max(0, cx - HALF), max(0, cy - HALF)
    example = crop_inplane(stack, x0, x0 + 2 * HALF, y0, y0 + 2 * HALF, phases=list(range(0, stack.shape[3], 2)))
    example.meta["descrip"] = (
        f"SCD0000301 (Sunnybrook, CC0) crop x{x0}:{x0 + 2 * HALF} y{y0}:{y0 + 2 * HALF} even phases"
    )
    write_nifti(example, output, overwrite=True, dtype=np.int16)
    print(f"wrote {output}: shape {example.shape}, crop x {x0}:{x0 + 2 * HALF}, y {y0}:{y0 + 2 * HALF}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
