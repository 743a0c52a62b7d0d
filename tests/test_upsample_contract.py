"""The output contract of upsampling, for the linear method, on phantom and real data."""

import warnings

import nibabel as nib
import numpy as np
import pytest

from bundle.cli import main
from bundle.io import read_sax
from bundle.stack import voxel_to_world
from bundle.upsample import bisect, linear_midpoints, upsample_stack


def assert_contract(stack, dense, factor):
    x, y, z, t = stack.shape
    assert dense.shape == (x, y, (z - 1) * factor + 1, t)
    np.testing.assert_allclose(dense.affine[:3, :2], stack.affine[:3, :2], atol=1e-6)  # in-plane grid
    np.testing.assert_allclose(dense.affine[:3, 3], stack.affine[:3, 3], atol=1e-6)  # origin
    np.testing.assert_allclose(dense.affine[:3, 2], stack.affine[:3, 2] / factor, atol=1e-6)
    # output slice k * factor sits where acquired slice k is, and equals it value for value
    for k in range(z):
        np.testing.assert_allclose(
            voxel_to_world(dense.affine, [3, 2, k * factor]), voxel_to_world(stack.affine, [3, 2, k]), atol=1e-4
        )
        np.testing.assert_array_equal(dense.array[:, :, k * factor].astype(np.float32), stack.array[:, :, k])


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_linear_contract_on_phantom(phantom_subject, factor):
    stack = phantom_subject.sparse
    dense = upsample_stack(stack, factor)
    assert_contract(stack, dense, factor)
    # linear: slice k*f + j is the blend (1 - j/f) s(k) + (j/f) s(k+1), in the input's scale
    j = factor // 2
    if j:
        a, b = stack.array[:, :, 1].astype(np.float64), stack.array[:, :, 2].astype(np.float64)
        np.testing.assert_allclose(dense.array[:, :, factor + j], (1 - j / factor) * a + j / factor * b, atol=1e-3)


def test_linear_quality_floor_against_dense_truth(phantom_subject):
    """x4 from 8 mm against the phantom's dense truth: a known answer, with a floor on PSNR."""
    dense = upsample_stack(phantom_subject.sparse, 4)
    truth = phantom_subject.truth.array[:, :, ::2].astype(np.float64)  # 2 mm truth
    err = dense.array - truth
    peak = np.percentile(truth, 99.5)
    psnr = 10 * np.log10(peak**2 / np.mean(err**2))
    assert psnr > 25.0  # 28.5 dB measured on this subject; only generated slices carry error
    assert np.all(err[:, :, ::4] == 0)


def test_bisect_equals_direct_linear_weights():
    rng = np.random.default_rng(0)
    import torch

    slices = torch.from_numpy(rng.random((4, 2, 5, 6)))
    dense = bisect(slices, 8, linear_midpoints)
    for k in range(3):
        for j in range(8):
            expected = (1 - j / 8) * slices[k] + (j / 8) * slices[k + 1]
            torch.testing.assert_close(dense[8 * k + j], expected, rtol=0, atol=1e-12)


def test_cli_upsample_sunnybrook(sunnybrook, tmp_path, capsys):
    study = sunnybrook / "SCD0000301" / "dicom"
    out = tmp_path / "dense.nii.gz"
    main(
        ["upsample", str(study), str(out), "--factor", "4", "--method", "linear", "--preview", str(tmp_path / "p.png")]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = read_sax(study)
    dense = read_sax(out)
    assert_contract(stack, dense, 4)
    assert dense.shape == (256, 256, 37, 20)
    assert dense.slice_spacing == pytest.approx(2.0, abs=1e-3)
    assert (tmp_path / "p.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "37 slices, 20 phase(s)" in printed and "runtime:" in printed


def test_cli_convert_then_upsample_nifti(tmp_path):
    from dicom_factory import write_series

    write_series(tmp_path / "d")
    main(["convert", str(tmp_path / "d"), str(tmp_path / "s.nii.gz")])
    main(["upsample", str(tmp_path / "s.nii.gz"), str(tmp_path / "x2.nii.gz"), "--factor", "2", "--method", "linear"])
    stack, dense = read_sax(tmp_path / "s.nii.gz"), read_sax(tmp_path / "x2.nii.gz")
    assert_contract(stack, dense, 2)
    assert nib.load(tmp_path / "x2.nii.gz").header.get_xyzt_units() == ("mm", "msec")
