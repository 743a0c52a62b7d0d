"""The phantom: seeded, anatomically ordered, sparse = every dense_factor-th truth slice."""

import json

import nibabel as nib
import numpy as np

from bundle.cli import main
from bundle.phantom import LABELS, make_subject
from bundle.studies import list_studies


def test_seeded_and_distinct():
    a = make_subject(seed=5, size=32, num_slices=4, num_phases=2, pixel_spacing=4.0)
    b = make_subject(seed=5, size=32, num_slices=4, num_phases=2, pixel_spacing=4.0)
    c = make_subject(seed=6, size=32, num_slices=4, num_phases=2, pixel_spacing=4.0)
    np.testing.assert_array_equal(a.truth.array, b.truth.array)
    assert not np.array_equal(a.truth.array, c.truth.array)


def test_sparse_is_subsampled_truth_with_consistent_geometry(phantom_subject):
    s, t = phantom_subject.sparse, phantom_subject.truth
    f = phantom_subject.params["dense_factor"]
    assert t.shape[2] == (s.shape[2] - 1) * f + 1
    np.testing.assert_array_equal(t.array[:, :, ::f], s.array)
    np.testing.assert_allclose(s.affine[:3, 2], t.affine[:3, 2] * f)
    assert s.slice_spacing == 8.0
    assert phantom_subject.labels.shape == t.shape


def test_anatomy_contracts_and_tapers(phantom_subject):
    labels = phantom_subject.labels.array
    lv = (labels == LABELS["lv_cavity"]).sum(axis=(0, 1))  # (z, t)
    assert lv[:, 0].max() > 0 and labels.max() == 3
    assert (labels == LABELS["rv_cavity"]).any() and (labels == LABELS["lv_myocardium"]).any()
    # end-systole (middle of the cycle) has a smaller cavity than end-diastole
    assert lv[:, lv.shape[1] // 2].sum() < lv[:, 0].sum()
    # the cavity shrinks from its widest slice towards the apex
    widest = int(np.argmax(lv[:, 0]))
    assert lv[-1, 0] < lv[widest, 0]
    # the blood pool is bright, the myocardium darker
    truth = phantom_subject.truth.array
    assert truth[labels == 1].mean() > 2 * truth[labels == 2].mean()


def test_cli_phantom_folder_is_a_dataset(tmp_path):
    main(["phantom", str(tmp_path), "--subjects", "2", "--size", "24", "--slices", "4", "--phases", "2"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "phantom.json",
        "phantom_000.nii.gz",
        "phantom_000_labels.nii.gz",
        "phantom_000_truth.nii.gz",
        "phantom_001.nii.gz",
        "phantom_001_labels.nii.gz",
        "phantom_001_truth.nii.gz",
    ]
    assert [p.name for p in list_studies(tmp_path)] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert nib.load(tmp_path / "phantom_000.nii.gz").shape == (24, 24, 4, 2)
    assert nib.load(tmp_path / "phantom_000_truth.nii.gz").shape == (24, 24, 25, 2)
    assert json.loads((tmp_path / "phantom.json").read_text())["labels"] == LABELS
