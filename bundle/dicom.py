"""DICOM SAX cine series -> :class:`SaxStack`, with exact geometry.

Images are sorted into a (slice, phase) grid from the geometry (position projected on the slice
normal) and from TriggerTime, never from file names, InstanceNumber or SliceLocation.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import InputRefused
from .stack import SaxStack

logger = logging.getLogger(__name__)

# DICOM is LPS, NIfTI is RAS: flip the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".ima")
# Slice gaps may differ by this fraction of the mean gap (scanner rounding) before we refuse.
SPACING_TOLERANCE = 0.05
# Slices whose normals differ by more than this angle are not one stack.
PARALLEL_TOLERANCE_DEG = 1.0


def dicom_candidates(folder: Path):
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [p for p in files if p.suffix.lower() in DICOM_SUFFIXES]  # .nii and .nii.gz are not among them


def _series_label(datasets):
    ds = datasets[0]
    return (
        f"SeriesInstanceUID={getattr(ds, 'SeriesInstanceUID', '?')} "
        f"SeriesNumber={getattr(ds, 'SeriesNumber', '?')} "
        f"description='{getattr(ds, 'SeriesDescription', '')}' images={len(datasets)}"
    )


def read_dicom_folder(folder, series_uid: str | None = None) -> SaxStack:
    """Read one SAX cine series from a folder (searched recursively).

    With several series, the one that forms a multi-slice cine stack is chosen; if none or
    more than one does, the error lists the series so the caller can pass ``series_uid``.
    """
    folder = Path(folder)
    # Header blemishes (invalid UIDs and the like) warn lazily on every access: collect them and
    # report each distinct kind once, instead of failing or flooding the terminal.
    pydicom_logger = logging.getLogger("pydicom")  # it logs each warning as well
    level = pydicom_logger.level
    pydicom_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stack = _read_dicom_series(folder, series_uid)
    finally:
        pydicom_logger.setLevel(level)
    kinds = defaultdict(list)  # "Invalid value for VR UI" -> every message of that kind
    for w in caught:
        kinds[str(w.message).split(":")[0]].append(str(w.message))
    for messages in kinds.values():
        first, n = messages[0], len(messages)
        message = f"{folder}: {n} DICOM header warning(s) like: {first[:200]}"
        stack.meta.setdefault("warnings", []).append(message)
        warnings.warn(message, stacklevel=2)
    return stack


def _read_dicom_series(folder: Path, series_uid):
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = dicom_candidates(folder)
    if not files:
        raise InputRefused(f"no DICOM files in {folder} (looked for *.dcm, *.dicom, *.ima and files without suffix)")
    series = defaultdict(list)
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
        except InvalidDicomError as e:
            raise InputRefused(f"not a readable DICOM file: {f} ({e})") from e
        except Exception as e:
            raise InputRefused(f"cannot read DICOM file {f}: {e}") from e
        if "PixelData" not in ds:
            logger.info("skipping %s: no pixel data (e.g. DICOMDIR or a report)", f)
            continue
        ds.filename = str(f)
        series[str(getattr(ds, "SeriesInstanceUID", "unknown"))].append(ds)
    if not series:
        raise InputRefused(f"no DICOM images with pixel data in {folder}")

    if series_uid is not None:
        if series_uid not in series:
            listing = "\n  ".join(_series_label(v) for v in series.values())
            raise InputRefused(f"series {series_uid} not found in {folder}; series present:\n  {listing}")
        chosen = series[series_uid]
    elif len(series) == 1:
        chosen = next(iter(series.values()))
    else:
        cines = [v for v in series.values() if _looks_like_sax_cine(v)]
        if len(cines) != 1:
            listing = "\n  ".join(_series_label(v) for v in series.values())
            what = "no series" if not cines else f"{len(cines)} series"
            raise InputRefused(
                f"{folder} holds {len(series)} series and {what} looks like a short-axis cine stack "
                f"(several parallel slices, several phases each); pick one with series_uid / --series-uid:\n"
                f"  {listing}"
            )
        chosen = cines[0]
    return _stack_from_datasets(chosen, folder)


def _geometry(ds):
    try:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        spacing = np.array([float(v) for v in ds.PixelSpacing], dtype=np.float64)
    except (AttributeError, TypeError, ValueError) as e:
        raise InputRefused(
            f"{ds.filename}: missing or malformed geometry (ImageOrientationPatient, ImagePositionPatient, "
            f"PixelSpacing): {e}"
        ) from e
    row_dir, col_dir = iop[:3], iop[3:]  # row_dir: along a row (increasing column index)
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 1e-6:
        raise InputRefused(f"{ds.filename}: degenerate ImageOrientationPatient {iop.tolist()}")
    return row_dir, col_dir, normal / np.linalg.norm(normal), ipp, spacing


def _looks_like_sax_cine(datasets):
    try:
        normals = [_geometry(d)[2] for d in datasets]
    except InputRefused:
        return False
    if any(np.dot(n, normals[0]) < np.cos(np.radians(PARALLEL_TOLERANCE_DEG)) for n in normals):
        return False
    positions = {round(float(np.dot(_geometry(d)[3], normals[0])), 2) for d in datasets}
    return len(positions) >= 2 and len(datasets) > len(positions)


def _trigger_time(ds):
    value = getattr(ds, "TriggerTime", None)
    if value in (None, ""):
        return None
    return float(value)


def _stack_from_datasets(datasets, folder) -> SaxStack:
    geoms = [_geometry(d) for d in datasets]
    row0, col0, normal0, _, spacing0 = geoms[0]
    cos_tol = np.cos(np.radians(PARALLEL_TOLERANCE_DEG))
    for d, (row, col, normal, _, spacing) in zip(datasets, geoms):
        if np.dot(normal, normal0) < cos_tol:
            angle = np.degrees(np.arccos(np.clip(np.dot(normal, normal0), -1, 1)))
            raise InputRefused(
                f"slices are not parallel: {Path(d.filename).name} is tilted {angle:.1f} degrees from "
                f"{Path(datasets[0].filename).name}"
            )
        if np.dot(row, row0) < cos_tol or not np.allclose(spacing, spacing0, rtol=1e-3):
            raise InputRefused(
                f"{Path(d.filename).name}: in-plane orientation or pixel spacing differs from the rest of the series"
            )
        if (d.Rows, d.Columns) != (datasets[0].Rows, datasets[0].Columns):
            raise InputRefused(f"{Path(d.filename).name}: image size differs from the rest of the series")

    # Group images by position along the normal (clustered with a 0.1 mm tolerance).
    heights = np.array([np.dot(g[3], normal0) for g in geoms])
    order = np.argsort(heights, kind="stable")
    slices: list[list[int]] = []
    for idx in order:
        if slices and abs(heights[idx] - heights[slices[-1][0]]) < 0.1:
            slices[-1].append(idx)
        else:
            slices.append([idx])
    if len(slices) < 2:
        raise InputRefused(
            f"{folder}: all {len(datasets)} images lie at one slice position; a stack needs at least two slices"
        )
    counts = [len(s) for s in slices]
    if len(set(counts)) != 1:
        detail = ", ".join(f"slice {k} ({heights[s[0]]:.2f} mm): {len(s)}" for k, s in enumerate(slices))
        raise InputRefused(f"slices have different numbers of phases: {detail}")

    # Within a slice, order phases by TriggerTime (fall back to acquisition order only if absent).
    grid = []
    for k, members in enumerate(slices):
        times = [_trigger_time(datasets[i]) for i in members]
        if any(t is None for t in times):
            if len(members) > 1:
                raise InputRefused(
                    f"slice {k}: {len(members)} images at one position but TriggerTime missing, "
                    f"cannot order the phases"
                )
            times = [0.0]
        members = [m for _, m in sorted(zip(times, members), key=lambda p: p[0])]
        if len(set(times)) != len(times):
            raise InputRefused(f"slice {k}: two images share a TriggerTime; duplicate or mixed series?")
        grid.append(members)

    # Uneven spacing (a missing slice, a mixed stack) breaks a single affine: refuse, naming the gap.
    slice_heights = np.array([heights[s[0]] for s in slices])
    gaps = np.diff(slice_heights)
    typical = float(np.median(gaps))  # robust to the one odd gap we want to name
    worst = int(np.argmax(np.abs(gaps - typical)))
    if abs(gaps[worst] - typical) > SPACING_TOLERANCE * typical:
        raise InputRefused(
            f"uneven slice spacing: the gap between slice {worst} and slice {worst + 1} is {gaps[worst]:.2f} mm "
            f"while the typical gap is {typical:.2f} mm (a missing slice?); all gaps (mm): "
            f"{', '.join(f'{x:.2f}' for x in gaps)}"
        )

    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    array = np.empty((cols, rows, len(slices), counts[0]), dtype=np.float32)
    for k, members in enumerate(grid):
        for t, i in enumerate(members):
            array[:, :, k, t] = _pixels(datasets[i]).T  # (rows, cols) -> (x=col, y=row)

    first = [geoms[s[0]][3] for s in slices]
    step = (first[-1] - first[0]) / (len(slices) - 1)  # mean step, the measured spacing
    lps = np.eye(4)
    lps[:3, 0] = row0 * spacing0[1]  # x: along a row, column spacing
    lps[:3, 1] = col0 * spacing0[0]  # y: down a column, row spacing
    lps[:3, 2] = step
    lps[:3, 3] = first[0]
    trigger = [(_trigger_time(datasets[i]) or 0.0) for i in grid[0]]
    ds0 = datasets[grid[0][0]]
    meta = {
        "source": str(folder),
        "was_3d": counts[0] == 1,
        "trigger_times": trigger,
        "slice_positions_lps": [p.tolist() for p in first],
        # [slice][phase] -> InstanceNumber, to place annotations made on the DICOM images
        "instance_numbers": [[int(getattr(datasets[i], "InstanceNumber", -1) or -1) for i in m] for m in grid],
        "descrip": f"{getattr(ds0, 'PatientID', '')} series {getattr(ds0, 'SeriesNumber', '')}".strip(),
        "series_uid": str(getattr(ds0, "SeriesInstanceUID", "")),
    }
    return SaxStack(array, LPS_TO_RAS @ lps, meta)


def _pixels(ds):
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as e:
        raise InputRefused(f"cannot decode pixel data of {ds.filename} (truncated or corrupt?): {e}") from e
    if pixels.ndim != 2:
        raise InputRefused(f"{ds.filename}: expected one 2D frame, got pixel array {pixels.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return pixels * slope + intercept
