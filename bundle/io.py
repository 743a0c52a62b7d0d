"""Short-axis cine I/O with exact geometry: NIfTI and DICOM in, NIfTI out.

Every reader returns a :class:`SaxStack`: an array indexed (x, y, slice, phase) and a RAS
affine whose third column is the measured slice step. DICOM folders are sorted into a
(slice, phase) grid from the geometry (position projected on the slice normal) and from
TriggerTime, never from file names, InstanceNumber or SliceLocation.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

# DICOM is LPS, NIfTI is RAS: flip the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".ima")
# Slice gaps may differ by this fraction of the mean gap (scanner rounding) before we refuse.
SPACING_TOLERANCE = 0.05
# Slices whose normals differ by more than this angle are not one stack.
PARALLEL_TOLERANCE_DEG = 1.0


class InputRefused(ValueError):
    """The project's one refusal: an input, option, weights file or output path that cannot be
    used, found before any work starts. The message says why; the CLI prints it on one line and
    exits with code 2."""


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def as_flag(value, name) -> bool:
    """A yes/no option from Python, the command line or a bundle override (which arrive as
    strings, where "false" would be truthy): true/false, 1/0, yes/no, on/off in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise InputRefused(f"{name} must be true or false (or 1/0, yes/no), got {value!r}")


@dataclasses.dataclass
class SaxStack:
    """A short-axis (cine) stack: ``array[x, y, slice, phase]`` and its RAS ``affine``.

    ``affine[:3, 2]`` is the step from one slice to the next in world millimetres, so
    ``np.linalg.norm(affine[:3, 2])`` is the measured slice spacing. ``meta`` holds what a
    writer needs: ``trigger_times`` (ms, per phase), ``source``, ``was_3d`` (a 3D input is
    written back as 3D) and free-form header fields.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 4:
            raise InputRefused(f"expected an array (x, y, slice, phase), got shape {self.array.shape}")

    @property
    def shape(self):
        return self.array.shape

    @property
    def pixel_spacing(self):
        """In-plane spacing (x, y) in mm."""
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(2))

    @property
    def slice_spacing(self):
        """Distance between the slice planes (mm), along their normal: the slice step's length
        when the slices are orthogonal to it, shorter when the affine is sheared."""
        step = self.affine[:3, 2]
        length = float(np.linalg.norm(step))
        normal = np.cross(self.affine[:3, 0], self.affine[:3, 1])
        if not np.linalg.norm(normal):
            return length
        along = float(abs(step @ normal) / np.linalg.norm(normal))
        return length if abs(along - length) <= 1e-9 * length else along  # exact when not sheared

    def validate(self):
        """Refuse stacks no method can upsample; returns self."""
        x, y, z, t = self.array.shape
        if x < 2 or y < 2:
            raise InputRefused(f"expected 2D slices, got in-plane size {x}x{y}")
        if z < 2:
            raise InputRefused(
                f"a stack needs at least two slices to interpolate between, got {z} slice(s) "
                f"(shape {self.array.shape})"
            )
        if not np.all(np.isfinite(self.array)):
            bad = np.argwhere(~np.isfinite(self.array))[0]
            raise InputRefused(
                f"non-finite intensity (NaN or inf) in the input, first at voxel (x, y, slice, phase) = {tuple(bad)}"
            )
        largest, limit = float(np.max(np.abs(self.array))), float(np.finfo(np.float32).max)
        if largest > limit:  # outputs are float32: this would be written as inf
            raise InputRefused(
                f"intensities up to {largest:.3g} do not fit the float32 output (largest {limit:.3g}); "
                "rescale the input"
            )
        if not np.all(np.isfinite(self.affine)) or abs(np.linalg.det(self.affine[:3, :3])) < 1e-9:
            raise InputRefused(f"the affine is degenerate or non-finite:\n{self.affine}")
        return self


# ----------------------------------------------------------------------------- reading


def read_sax(path, series_uid: str | None = None) -> SaxStack:
    """Read a SAX stack from a NIfTI file (3D or 4D) or a DICOM folder, and validate it."""
    path = Path(path)
    if not path.exists():
        raise InputRefused(f"input not found: {path}")
    if path.is_dir():
        stack = read_dicom_folder(path, series_uid=series_uid)
    elif path.name.endswith(NIFTI_SUFFIXES):
        stack = read_nifti(path)
    else:
        raise InputRefused(f"unsupported input {path}: expected a NIfTI file (.nii, .nii.gz) or a DICOM folder")
    return stack.validate()


def read_nifti(path) -> SaxStack:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for truncated or corrupt files
        raise InputRefused(f"cannot read NIfTI {path}: {e}") from e
    if data.ndim == 2 or (data.ndim >= 3 and data.shape[2] == 1 and data.ndim <= 4):
        raise InputRefused(f"{path} holds a single 2D slice (shape {data.shape}); a stack needs at least two slices")
    if data.ndim == 5 and data.shape[4] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise InputRefused(f"{path}: expected a 3D (x, y, slice) or 4D (x, y, slice, phase) image, got {data.shape}")
    was_3d = data.ndim == 3
    if was_3d:
        data = data[..., None]
    dt = float(img.header.get_zooms()[3]) if not was_3d and len(img.header.get_zooms()) > 3 else 0.0
    meta = {
        "source": str(path),
        "was_3d": was_3d,
        "trigger_times": [i * dt for i in range(data.shape[3])],
        "descrip": _nifti_descrip(img.header),
    }
    qform, qcode = img.get_qform(coded=True)
    sform, scode = img.get_sform(coded=True)
    if qcode and scode and not np.allclose(qform, sform, atol=1e-3):
        warnings.warn(f"{path}: the qform and the sform disagree; using the sform (as nibabel and most tools do)")
    return SaxStack(np.asarray(data), img.affine, meta)


def _nifti_descrip(header):
    try:
        return header["descrip"].item().decode("latin-1").strip("\x00")
    except Exception:
        return ""


def dicom_candidates(folder: Path):
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [p for p in files if p.suffix.lower() in DICOM_SUFFIXES and not p.name.endswith(NIFTI_SUFFIXES)]


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


# ----------------------------------------------------------------------------- writing


def check_output_path(output, inputs=(), overwrite=False) -> Path:
    """Refuse to overwrite an input, or an existing output unless ``overwrite``."""
    output = Path(output)
    if not output.name.endswith(NIFTI_SUFFIXES):
        raise InputRefused(f"output must be a NIfTI file (.nii or .nii.gz): {output}")
    resolved = output.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if resolved == src or (src.is_dir() and src in resolved.parents):
            raise InputRefused(f"refusing to write {output} over (or inside) the input {src}")
    if output.is_dir():
        raise InputRefused(f"output {output} is a folder; give a file name ending in .nii.gz")
    if output.exists() and not overwrite:
        raise InputRefused(f"{output} exists; pass --overwrite to replace it")
    check_writable_folder(output.parent)
    return output


def check_writable_folder(folder) -> Path:
    """Refuse, before any work, a folder that cannot be created or written (its nearest existing
    ancestor decides; nothing is created here)."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputRefused(f"cannot write into {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputRefused(f"cannot write into {folder}: {existing} is not writable")
    return folder


def write_nifti(stack: SaxStack, output, overwrite=False, inputs=(), dtype=np.float32) -> Path:
    """Write ``stack`` with its exact affine, atomically (temporary file, then rename)."""
    output = check_output_path(output, inputs=inputs, overwrite=overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    data = stack.array.astype(dtype, copy=False)
    if stack.meta.get("was_3d") and data.shape[3] == 1:
        data = data[..., 0]
    img = nib.Nifti1Image(data, stack.affine)
    img.set_sform(stack.affine, code=1)
    img.set_qform(stack.affine, code=1)
    if not np.allclose(img.get_qform(), stack.affine, atol=1e-4):
        img.set_qform(None, code=0)  # a qform cannot hold a shear: leave the sform alone in charge
    img.header.set_xyzt_units("mm", "msec")
    times = stack.meta.get("trigger_times") or []
    if data.ndim == 4 and len(times) > 1:
        zooms = list(img.header.get_zooms())
        zooms[3] = float(np.mean(np.diff(times)))
        img.header.set_zooms(zooms)
    img.header["descrip"] = str(stack.meta.get("descrip", ""))[:79].encode("latin-1", "replace")
    return atomic_write(output, lambda tmp: nib.save(img, tmp))


def atomic_write(path, write) -> Path:
    """All or nothing: ``write(tmp)`` fills a hidden temporary file beside ``path``
    (``.NAME.XXXX.part.SUFFIX``, so formats read from the suffix still apply), which is then
    renamed over ``path``. A failure leaves no temporary file; one left by a killed earlier
    write of the same ``path`` is removed first. Every file the bundle writes goes through here."""
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.part{suffix}"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def voxel_to_world(affine, ijk):
    """World (RAS) coordinates of voxel indices ``ijk`` (..., 3)."""
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def crop_inplane(stack: SaxStack, x0, x1, y0, y1, phases=None) -> SaxStack:
    """Crop ``[x0:x1, y0:y1]`` (and optionally a phase selection), moving the origin so that
    every kept voxel keeps its world position."""
    array = stack.array[x0:x1, y0:y1]
    meta = dict(stack.meta)
    if phases is not None:
        array = array[..., phases]
        meta["trigger_times"] = [stack.meta["trigger_times"][p] for p in phases]
        if "instance_numbers" in meta:
            meta["instance_numbers"] = [[row[p] for p in phases] for row in meta["instance_numbers"]]
    affine = stack.affine.copy()
    affine[:3, 3] = voxel_to_world(stack.affine, [x0, y0, 0])
    return SaxStack(np.ascontiguousarray(array), affine, meta)
