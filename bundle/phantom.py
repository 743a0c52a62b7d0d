"""A procedural 3D+T cardiac phantom with a dense ground truth.

Each subject is drawn from seeded random parameters: an ellipsoidal LV (blood pool and
myocardium) that tapers from base to apex and twists and drifts smoothly along the long axis,
a crescent RV that ends before the apex, surrounding tissue with smooth texture, lungs, a bias
field and noise. Over the cycle the LV contracts, the wall thickens and the base descends.

The dense truth is sampled every ``sparse_spacing / dense_factor`` mm along the slice normal;
the sparse stack a scanner would give is exactly every ``dense_factor``-th dense slice, so
any upsampling method can be scored against the truth at every generated position.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from .io import write_nifti
from .stack import SaxStack

LABELS = {"background": 0, "lv_cavity": 1, "lv_myocardium": 2, "rv_cavity": 3}
TRUTH_SUFFIX = "_truth"
LABELS_SUFFIX = "_labels"
COMPANION_SUFFIXES = (TRUTH_SUFFIX, LABELS_SUFFIX)


@dataclasses.dataclass
class PhantomSubject:
    sparse: SaxStack  # what a scanner gives: every dense_factor-th slice
    truth: SaxStack  # dense ground truth
    labels: SaxStack  # dense label map (LABELS)
    params: dict


def _soft_inside(signed_distance_mm, edge_mm):
    """Partial-volume mask: 1 inside, 0 outside, a smooth edge about ``edge_mm`` wide."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_distance_mm / edge_mm, -50, 50)))


def _random_rotation(rng, max_tilt_deg=35.0):
    """An oblique orientation, like a real SAX plan (tilted from the scanner axes)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(10.0, max_tilt_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def make_subject(
    seed: int,
    size: int = 128,
    pixel_spacing: float = 1.25,
    num_slices: int = 11,
    num_phases: int = 10,
    sparse_spacing: float = 8.0,
    dense_factor: int = 8,
    noise: float = 0.02,
) -> PhantomSubject:
    rng = np.random.default_rng(seed)
    dz = sparse_spacing / dense_factor
    num_dense = (num_slices - 1) * dense_factor + 1
    z = np.arange(num_dense) * dz  # mm along the slice normal, 0 = first (basal) slice
    half = size * pixel_spacing / 2
    coords = (np.arange(size) + 0.5) * pixel_spacing - half
    gx, gy = np.meshgrid(coords, coords, indexing="ij")  # (x, y) in mm from the image centre

    p = {
        "seed": seed,
        "lv_length_mm": rng.uniform(0.72, 0.85) * (num_slices - 1) * sparse_spacing,
        "base_offset_mm": rng.uniform(2.0, 8.0),
        "epi_radius_mm": rng.uniform(24.0, 32.0),
        "wall_mm": rng.uniform(7.0, 11.0),
        "ellipticity": rng.uniform(0.85, 1.0),
        "twist_rad": rng.uniform(-0.6, 0.6),
        "orientation_rad": rng.uniform(0, np.pi),
        "center_mm": rng.uniform(-8, 8, size=2).tolist(),
        "drift_mm": rng.uniform(-10, 10, size=2).tolist(),
        "rv_angle_rad": rng.uniform(0.7, 1.3) * np.pi,
        "rv_radius_mm": rng.uniform(20.0, 26.0),
        "rv_length_frac": rng.uniform(0.65, 0.85),
        "ejection": rng.uniform(0.15, 0.3),  # fractional shrink of the cavity radius at end-systole
        "base_descent_mm": rng.uniform(6.0, 12.0),
        "blood": rng.uniform(0.9, 1.0),
        "myocardium": rng.uniform(0.22, 0.32),
        "tissue": rng.uniform(0.38, 0.5),
        "lung": rng.uniform(0.04, 0.1),
        "noise": noise,
    }
    # Smooth texture of the surrounding tissue, fixed in space; a smooth coil bias field.
    texture = gaussian_filter(rng.normal(size=(size, size, num_dense)), sigma=(3, 3, 3 / dz))
    texture /= texture.std() + 1e-8
    bias = 1.0 + 0.15 * (gx * rng.normal() + gy * rng.normal()) / half

    truth = np.empty((size, size, num_dense, num_phases), dtype=np.float32)
    labels = np.zeros((size, size, num_dense, num_phases), dtype=np.uint8)
    edge = 0.5 * pixel_spacing
    # the field of view is a crop around the heart: chest wall at the corners, lungs at the sides
    body = ((gx / (1.3 * half)) ** 2 + (gy / (1.05 * half)) ** 2) ** 0.5
    left_x, right_x = rng.uniform(0.75, 0.95, size=2) * half
    lung_l = (((gx + left_x) / (0.35 * half)) ** 2 + ((gy + 0.05 * half) / (0.6 * half)) ** 2) ** 0.5
    lung_r = (((gx - right_x) / (0.35 * half)) ** 2 + ((gy + 0.1 * half) / (0.55 * half)) ** 2) ** 0.5
    in_body = _soft_inside((body - 1) * half, edge)
    in_lung = np.maximum(
        _soft_inside((lung_l - 1) * 0.3 * half, 2 * edge), _soft_inside((lung_r - 1) * 0.3 * half, 2 * edge)
    )

    for t in range(num_phases):
        c = 0.5 - 0.5 * np.cos(2 * np.pi * t / num_phases)  # 0 at end-diastole, 1 at end-systole
        for k in range(num_dense):
            u = (z[k] - p["base_offset_mm"] - p["base_descent_mm"] * c) / p["lv_length_mm"]  # 0 base, 1 apex
            taper = np.sqrt(np.clip(1 - u**2, 0, 1)) if u >= 0 else np.clip(1 + u / 0.06, 0, 1)
            epi = p["epi_radius_mm"] * taper * (1 - 0.08 * c)
            wall = p["wall_mm"] * (1 + 0.45 * c) * (0.8 + 0.2 * taper)
            cav = max(epi - wall, 0.0) * (1 - p["ejection"] * c) / (1 - 0.08 * c)
            cx = p["center_mm"][0] + p["drift_mm"][0] * u
            cy = p["center_mm"][1] + p["drift_mm"][1] * u
            theta = p["orientation_rad"] + p["twist_rad"] * u + 0.1 * c
            dx, dy = gx - cx, gy - cy
            rx = dx * np.cos(theta) + dy * np.sin(theta)
            ry = (-dx * np.sin(theta) + dy * np.cos(theta)) / p["ellipticity"]
            r = np.hypot(rx, ry)
            in_epi = _soft_inside(r - epi, edge) if epi > 0 else np.zeros_like(r)
            in_cav = _soft_inside(r - cav, edge) if cav > 0 else np.zeros_like(r)
            # RV: an ellipse beside the LV, minus the LV and its wall; shorter than the LV.
            rv_taper = np.sqrt(np.clip(1 - (u / p["rv_length_frac"]) ** 2, 0, 1)) if u >= 0 else taper
            rv_r = p["rv_radius_mm"] * rv_taper * (1 - 0.25 * c)
            ca, sa = np.cos(p["rv_angle_rad"]), np.sin(p["rv_angle_rad"])
            ox, oy = cx + ca * 0.8 * p["epi_radius_mm"], cy + sa * 0.8 * p["epi_radius_mm"]
            # flattened along the LV radius, wide around it: a crescent once the LV is cut out
            rr = np.hypot(((gx - ox) * ca + (gy - oy) * sa) / 0.75, (-(gx - ox) * sa + (gy - oy) * ca) / 1.35)
            in_rv = (_soft_inside(rr - rv_r, edge) if rv_r > 0 else np.zeros_like(rr)) * (
                1 - _soft_inside(r - epi - 2.5, edge)
            )
            tissue = p["tissue"] * (1 + 0.15 * texture[:, :, k])
            background = in_body * (tissue * (1 - in_lung) + p["lung"] * in_lung)
            myo = in_epi - in_cav
            img = background * (1 - in_epi - in_rv) + p["myocardium"] * myo + p["blood"] * (in_cav + in_rv)
            truth[:, :, k, t] = img * bias
            lab = np.zeros(r.shape, dtype=np.uint8)
            lab[in_rv > 0.5] = LABELS["rv_cavity"]
            lab[myo > 0.5] = LABELS["lv_myocardium"]
            lab[in_cav > 0.5] = LABELS["lv_cavity"]
            labels[:, :, k, t] = lab
    truth += rng.normal(scale=noise, size=truth.shape).astype(np.float32)
    truth = np.clip(truth, 0, None) * 1000.0  # scanner-like intensities, stored as int16
    truth = np.round(truth).astype(np.int16)

    rotation = _random_rotation(rng)
    dense_affine = np.eye(4)
    dense_affine[:3, :3] = rotation @ np.diag([pixel_spacing, pixel_spacing, dz])
    dense_affine[:3, 3] = rng.uniform(-50, 50, size=3)
    sparse_affine = dense_affine.copy()
    sparse_affine[:3, 2] *= dense_factor
    times = [1000.0 * t / num_phases for t in range(num_phases)]
    meta = {"trigger_times": times, "was_3d": False, "descrip": f"calid phantom seed {seed}"}
    p.update(pixel_spacing=pixel_spacing, sparse_spacing=sparse_spacing, dense_factor=dense_factor)
    return PhantomSubject(
        sparse=SaxStack(truth[:, :, ::dense_factor], sparse_affine, dict(meta)),
        truth=SaxStack(truth, dense_affine, dict(meta)),
        labels=SaxStack(labels, dense_affine, dict(meta)),
        params=p,
    )


def write_phantom_dataset(out_dir, subjects=4, seed=0, overwrite=False, progress=True, **kwargs):
    """Write ``subjects`` phantom subjects as NIfTI: ``phantom_NNN.nii.gz`` (sparse stack),
    ``phantom_NNN_truth.nii.gz`` (dense truth), ``phantom_NNN_labels.nii.gz`` (dense labels),
    and ``phantom.json`` with every subject's parameters."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {"labels": LABELS, "subjects": []}
    for i in tqdm(range(subjects), desc="phantom subjects", disable=not progress):
        subject = make_subject(seed=seed * 100003 + i, **kwargs)
        name = f"phantom_{i:03d}"
        write_nifti(subject.sparse, out_dir / f"{name}.nii.gz", overwrite=overwrite, dtype=np.int16)
        write_nifti(subject.truth, out_dir / f"{name}{TRUTH_SUFFIX}.nii.gz", overwrite=overwrite, dtype=np.int16)
        write_nifti(subject.labels, out_dir / f"{name}{LABELS_SUFFIX}.nii.gz", overwrite=overwrite, dtype=np.uint8)
        index["subjects"].append({"name": name, **subject.params})
    (out_dir / "phantom.json").write_text(json.dumps(index, indent=4))
    return out_dir
