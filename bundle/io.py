"""Short-axis cine I/O: NIfTI and DICOM in (as a validated :class:`SaxStack`), NIfTI out,
every file written atomically, every output path checked before any work starts."""

from __future__ import annotations

import glob
import os
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from .dicom import read_dicom_folder
from .errors import InputRefused
from .stack import SaxStack

NIFTI_SUFFIXES = (".nii", ".nii.gz")


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
