"""World coordinates of every voxel match the DICOM headers, to 1e-3 mm."""

import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_factory import code, rotation, write_series

from bundle.dicom import LPS_TO_RAS
from bundle.io import read_sax, write_nifti
from bundle.stack import voxel_to_world


def lps_world(stack, i, j, k):
    return (LPS_TO_RAS @ np.append(voxel_to_world(stack.affine, [i, j, k]), 1.0))[:3]


def expected_lps(ipp, orient, pixel_spacing, i, j):
    row_dir, col_dir = orient[:, 0], orient[:, 1]
    return ipp + i * pixel_spacing[1] * row_dir + j * pixel_spacing[0] * col_dir


@pytest.mark.parametrize(
    "orient",
    [np.eye(3), rotation(0.3, -0.5, 0.8), rotation(-1.2, 0.4, 2.5)],
    ids=["axial", "oblique", "double-oblique"],
)
def test_synthetic_series_geometry_and_order(tmp_path, orient):
    files = write_series(tmp_path / "dicom", orient=orient, shuffle=True)
    stack = read_sax(tmp_path / "dicom")
    assert stack.shape == (10, 12, 5, 3)  # (x = columns, y = rows, slices, phases)
    assert stack.pixel_spacing == pytest.approx((1.25, 1.5))
    assert stack.slice_spacing == pytest.approx(8.0, abs=1e-4)
    ii, jj = np.meshgrid(np.arange(10), np.arange(12), indexing="ij")
    for path, k, t, ipp in files:
        np.testing.assert_array_equal(stack.array[:, :, k, t], code(ii, jj, k, t))
        for i, j in [(0, 0), (9, 0), (0, 11), (9, 11), (4, 7)]:
            np.testing.assert_allclose(
                lps_world(stack, i, j, k), expected_lps(ipp, orient, (1.5, 1.25), i, j), atol=1e-3
            )
    assert stack.meta["trigger_times"] == [0.0, 37.5, 75.0]


def test_reversed_normal_still_sorted_along_normal(tmp_path):
    # Slices acquired apex to base: positions decrease along the normal; the stack is still
    # ordered by position, with a slice step pointing where the positions go.
    files = write_series(tmp_path / "d", gap=-6.0, slices=4, phases=2)
    stack = read_sax(tmp_path / "d")
    for path, k, t, ipp in files:
        kk = 3 - k  # the stack counts along +normal
        np.testing.assert_allclose(lps_world(stack, 0, 0, kk), ipp, atol=1e-3)
    assert stack.slice_spacing == pytest.approx(6.0, abs=1e-4)


def test_nifti_round_trip_keeps_exact_affine(tmp_path):
    write_series(tmp_path / "d")
    stack = read_sax(tmp_path / "d")
    out = write_nifti(stack, tmp_path / "s.nii.gz")
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, stack.affine, atol=1e-5)
    np.testing.assert_allclose(img.get_sform(), stack.affine, atol=1e-5)
    np.testing.assert_allclose(img.get_qform(), stack.affine, atol=1e-4)
    back = read_sax(out)
    np.testing.assert_array_equal(back.array, stack.array)
    assert back.meta["trigger_times"] == pytest.approx(stack.meta["trigger_times"])


def test_three_d_nifti_stays_three_d(tmp_path):
    data = np.random.default_rng(0).random((8, 9, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.2, 1.2, 7.0, 1.0])), tmp_path / "a.nii.gz")
    stack = read_sax(tmp_path / "a.nii.gz")
    assert stack.shape == (8, 9, 4, 1)
    out = write_nifti(stack, tmp_path / "b.nii.gz")
    assert nib.load(out).shape == (8, 9, 4)


def test_invalid_uid_warns_not_fails(tmp_path):
    write_series(tmp_path / "d", uid_root="1.2.03.4")  # "03": a leading zero is not a valid UID
    with pytest.warns(UserWarning, match="DICOM header warning"):
        stack = read_sax(tmp_path / "d")
    assert stack.shape[2:] == (5, 3)


def test_several_series_picks_the_cine(tmp_path):
    write_series(tmp_path / "d", series_number=5)
    write_series(tmp_path / "d" / "localizer", slices=1, phases=1, series_number=1, orient=rotation(1.5, 0, 0))
    stack = read_sax(tmp_path / "d")
    assert stack.shape == (10, 12, 5, 3)


def test_sunnybrook_geometry_against_headers(sunnybrook):
    """Every DICOM file of a real study lands at the (slice, phase) whose world position is
    its ImagePositionPatient, with the in-plane offsets of its orientation and spacing."""
    study = sunnybrook / "SCD0000401" / "dicom"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = read_sax(study)
        datasets = [pydicom.dcmread(f) for f in sorted(study.glob("*.dcm"))]
    assert stack.shape == (256, 256, 11, 20)
    assert stack.slice_spacing == pytest.approx(8.0, abs=0.01)
    index = {stack.array[:, :, k, t].tobytes(): (k, t) for k in range(11) for t in range(20)}
    times = np.zeros((11, 20))
    for ds in datasets:
        k, t = index[ds.pixel_array.astype(np.float32).T.tobytes()]
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        orient = np.stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])], axis=1)
        ps = [float(v) for v in ds.PixelSpacing]
        for i, j in [(0, 0), (255, 0), (0, 255), (255, 255), (100, 37)]:
            np.testing.assert_allclose(lps_world(stack, i, j, k), expected_lps(ipp, orient, ps, i, j), atol=1e-3)
        times[k, t] = float(ds.TriggerTime)
    assert np.all(np.diff(times, axis=1) > 0), "phases must be ordered by TriggerTime within every slice"


def test_sheared_affine_spacing_along_the_normal_and_consistent_header(tmp_path):
    """Slices not orthogonal to the slice step: planes 16 mm apart, step 20.3 mm long."""
    import nibabel as nib

    from bundle.io import write_nifti
    from bundle.pipeline import upsample_file

    affine = np.array([[1.5, 0, 12.5, 0], [0, 1.5, 0, 0], [0, 0, 16.0, 0], [0, 0, 0, 1.0]])
    data = np.random.default_rng(0).random((16, 16, 4, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "sheared.nii.gz")
    stack = read_sax(tmp_path / "sheared.nii.gz")
    assert stack.slice_spacing == pytest.approx(16.0)
    _, dense, _ = upsample_file(tmp_path / "sheared.nii.gz", tmp_path / "x2.nii.gz", factor=2, method="linear")
    assert dense.slice_spacing == pytest.approx(8.0)
    out = nib.load(tmp_path / "x2.nii.gz")
    sform, scode = out.get_sform(coded=True)
    qform, qcode = out.get_qform(coded=True)
    np.testing.assert_allclose(sform, dense.affine, atol=1e-5)
    assert scode == 1 and (qcode == 0 or np.allclose(qform, sform, atol=1e-4))  # never two answers
    write_nifti(read_sax(tmp_path / "x2.nii.gz"), tmp_path / "again.nii.gz")  # reads back the same
    np.testing.assert_allclose(read_sax(tmp_path / "again.nii.gz").affine, dense.affine, atol=1e-5)


def test_disagreeing_qform_and_sform_say_which_was_used(tmp_path):
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.diag([1.5, 1.5, 8.0, 1.0]))
    img.set_qform(np.diag([2.0, 2.0, 8.0, 1.0]), code=1)
    img.set_sform(np.diag([1.5, 1.5, 8.0, 1.0]), code=1)
    nib.save(img, tmp_path / "two.nii.gz")
    with pytest.warns(UserWarning, match="qform and the sform disagree; using the sform"):
        stack = read_sax(tmp_path / "two.nii.gz")
    assert stack.pixel_spacing == pytest.approx((1.5, 1.5))
