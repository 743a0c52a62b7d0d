"""Write synthetic DICOM SAX cine series with pydicom, with a known geometry and pixel code.

Pixel (column i, row j) of slice k, phase t holds ``code(i, j, k, t)``, so a reader's output
can be checked voxel by voxel for ordering and transposition.
"""

import random
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def code(i, j, k, t):
    return 1000 * k + 30 * t + (i % 5) + 5 * (j % 3)


def rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def write_series(
    folder,
    rows=12,
    cols=10,
    slices=5,
    phases=3,
    gap=8.0,
    pixel_spacing=(1.5, 1.25),  # (between rows, between columns), as DICOM orders it
    orient=rotation(0.3, -0.5, 0.8),
    origin=(-40.0, 25.0, 110.0),
    shuffle=True,
    seed=0,
    series_uid=None,
    series_number=5,
    drop=(),  # (k, t) pairs not written; t=None drops every phase of slice k
    tilt=None,  # (k, radians): tilt slice k about its row direction
    uid_root=None,  # e.g. "1.2.03" for a deliberately invalid UID
    pixels=None,  # callable (k, t) -> (rows, cols) uint16 image, instead of the pixel code
):
    """Write one series; returns the list of written files and each file's (k, t, ipp)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    row_dir, col_dir = orient[:, 0], orient[:, 1]
    normal = np.cross(row_dir, col_dir)
    series_uid = series_uid or (uid_root + ".99" if uid_root else generate_uid())
    study_uid = generate_uid()
    items = [(k, t) for k in range(slices) for t in range(phases) if (k, t) not in drop and (k, None) not in drop]
    names = list(range(len(items)))
    if shuffle:
        rng.shuffle(names)
    written = []
    for (k, t), name in zip(items, names):
        r, c = row_dir, col_dir
        if tilt is not None and tilt[0] == k:
            a = tilt[1]
            c = np.cos(a) * col_dir + np.sin(a) * normal
        ipp = np.asarray(origin) + k * gap * normal
        sop = (uid_root + f".{k}.{t}") if uid_root else generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = "synthetic sax cine"
        ds.Modality = "MR"
        ds.PatientID = "SYNTH"
        # File order, InstanceNumber and SliceLocation deliberately disagree with the geometry.
        ds.InstanceNumber = name + 1
        ds.SliceLocation = float(rng.uniform(-100, 100))
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([r, c])]
        ds.PixelSpacing = [f"{v}" for v in pixel_spacing]
        ds.SliceThickness = gap
        ds.TriggerTime = 37.5 * t
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # (rows, cols)
        image = code(ii, jj, k, t) if pixels is None else pixels(k, t)
        ds.PixelData = np.ascontiguousarray(image, dtype=np.uint16).tobytes()
        path = folder / f"IMG{name:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append((path, k, t, ipp))
    return written
