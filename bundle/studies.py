"""Studies: where they are (a folder of NIfTI files and DICOM folders, or a Decathlon-style
datalist), what they are called, and the patient-level split into training and validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .dicom import dicom_candidates
from .errors import InputRefused
from .io import NIFTI_SUFFIXES, read_sax
from .phantom import COMPANION_SUFFIXES, LABELS_SUFFIX

DATALIST_KEYS = ("testing", "validation", "training")


def _is_companion(path: Path):
    stem = path.name
    for suffix in NIFTI_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem.endswith(COMPANION_SUFFIXES)


def list_studies(dataset_dir) -> list[Path]:
    """Studies in a folder: every NIfTI file (dense truth and label companions excluded, by
    their ``_truth``/``_labels`` names) and every sub-folder holding DICOM files."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputRefused(f"dataset_dir {root} is not a folder")
    studies = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.endswith(NIFTI_SUFFIXES) and not _is_companion(entry):
            studies.append(entry)
        elif entry.is_dir() and dicom_candidates(entry):
            studies.append(entry)
    if not studies:
        raise InputRefused(f"no studies (NIfTI files or DICOM folders) in {root}")
    return studies


def load_datalist(datalist_json, key="training") -> list[Path]:
    """Studies of a Decathlon-style datalist: ``{"training": [{"image": path}, ...]}``,
    paths relative to the JSON file."""
    datalist_json = Path(datalist_json)
    content = json.loads(datalist_json.read_text())
    if key not in content:
        raise InputRefused(f"{datalist_json} has no '{key}' list (keys: {', '.join(content)})")
    entries = content[key]
    return [(datalist_json.parent / (e["image"] if isinstance(e, dict) else e)).resolve() for e in entries]


def find_studies(dataset_dir=None, datalist=None, key="training") -> list[Path]:
    """Studies from a Decathlon-style datalist if given, else from a folder."""
    if datalist:
        return load_datalist(datalist, key=key)
    if not dataset_dir:
        raise InputRefused("set dataset_dir (a folder of studies) or datalist (a Decathlon-style JSON)")
    return list_studies(dataset_dir)


def study_name(path) -> str:
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def split_studies(studies, val_names=None, val_fraction=0.25, seed=0):
    """Patient-level split: every triplet of a study lands on one side. ``val_names`` (study
    names) wins over a seeded random ``val_fraction``."""
    studies = list(studies)
    if val_names:
        val_names = set(val_names)
        missing = val_names - {study_name(s) for s in studies}
        if missing:
            raise InputRefused(f"validation studies not found: {sorted(missing)}")
        val = [s for s in studies if study_name(s) in val_names]
    else:
        n_val = max(1, int(round(len(studies) * val_fraction))) if len(studies) > 1 else 0
        order = np.random.default_rng(seed).permutation(len(studies))
        val = [studies[i] for i in sorted(order[:n_val])]
    train = [s for s in studies if s not in val]
    return train, val


def batch_inputs(source, key=None):
    """Studies to upsample: a folder (NIfTI files and DICOM folders; a phantom folder's truth
    and label maps are left out) or a Decathlon-style datalist JSON (``key``, else the first
    of testing / validation / training that it holds)."""
    source = Path(source)
    if source.is_file() and source.suffix == ".json":
        if key is None:
            content = json.loads(source.read_text())
            key = next((k for k in DATALIST_KEYS if k in content), None)
            if key is None:
                raise InputRefused(f"{source} has none of the lists {', '.join(DATALIST_KEYS)}")
        return sorted(load_datalist(source, key=key))
    return sorted(find_studies(dataset_dir=source))


def lv_centre_from_contours(study_dir):
    """Mean of the Sunnybrook endocardial contour points, (column, row) = (x, y); None if absent."""
    files = sorted(Path(study_dir).glob("contours/i-contours/*.txt"))
    if not files:
        return None
    return tuple(np.concatenate([np.loadtxt(f) for f in files]).mean(axis=0))


def labels_path(path) -> Path:
    """``NAME_labels.nii.gz`` beside ``NAME.nii.gz``: the labelled-stack layout (phantoms, ED/ES)."""
    return Path(path).with_name(Path(path).name[: -len(".nii.gz")] + f"{LABELS_SUFFIX}.nii.gz")


def per_slice_normalised_stack(path):
    """A stack whose slices were each windowed on their own (the Sunnybrook ED/ES export), every
    slice divided by its own 99th percentile so that neighbours share a scale, and the LV centre
    from ``NAME_labels.nii.gz`` beside it (None without one)."""
    stack = read_sax(path)
    array = stack.array.astype(np.float64)
    top = np.percentile(array, 99, axis=(0, 1), keepdims=True)
    stack.array = array / np.maximum(top, 1e-12)
    centre = None
    if labels_path(path).exists():
        lv = np.argwhere(read_sax(labels_path(path)).array[..., 0] > 0)
        centre = tuple(lv[:, :2].mean(0)) if len(lv) else None
    return stack, centre


def dicom_folder(study) -> Path:
    """A Sunnybrook study's images: ``STUDY/dicom`` when it has one (beside ``contours/``), else ``STUDY``."""
    study = Path(study)
    return study / "dicom" if (study / "dicom").is_dir() else study


def labelled_stack_paths(folder, patients=None, exclude=()):
    """The labelled stacks (``NAME.nii.gz`` with ``NAME_labels.nii.gz``) of a folder, of the given
    patients only (names start with the patient id) or all but the excluded ones."""
    found = Path(folder).glob("*.nii.gz")
    paths = sorted(p for p in found if not p.name.endswith(f"{LABELS_SUFFIX}.nii.gz") and labels_path(p).exists())
    patient = lambda p: p.name.split("_")[0]  # noqa: E731
    if patients is not None:
        paths = [p for p in paths if patient(p) in set(patients)]
    return [p for p in paths if patient(p) not in set(exclude)]
