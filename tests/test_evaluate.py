"""Evaluation against fixed interpolation: the protocol's arithmetic on known answers."""

import json

import numpy as np
import pytest
import torch

from bundle.evaluate import evaluate, heart_box, leave_one_out, phantom_per_level
from bundle.stack import SaxStack
from bundle.upsample import linear_midpoints


def test_heart_box_stays_inside_the_image():
    stack = SaxStack(np.zeros((100, 60, 3, 1)), np.diag([2.0, 2.0, 8.0, 1.0]))
    assert heart_box(stack, (50, 30), heart_mm=40) == (40, 60, 20, 40)
    assert heart_box(stack, (2, 58), heart_mm=40) == (0, 20, 40, 60)
    assert heart_box(stack, None, heart_mm=400) == (0, 100, 0, 60)


def test_leave_one_out_scores_the_right_slices(phantom_subject):
    stack = phantom_subject.sparse

    def oracle(left, right, gap_mm):  # knows the answer: the acquired middle slices
        slices = torch.from_numpy(stack.array.transpose(2, 3, 0, 1).astype(np.float64))
        return slices[1:-1]

    result, predictions = leave_one_out(stack, {"linear": linear_midpoints, "oracle": oracle})
    assert predictions["oracle"].shape == (stack.shape[2] - 2, stack.shape[3]) + stack.shape[:2]
    assert result["oracle"]["ssim"] == pytest.approx(1.0, abs=1e-6) and result["oracle"]["psnr"] > 80
    assert 10 < result["linear"]["psnr"] < 40 and result["linear"]["ssim"] < 1


def test_phantom_levels_against_the_truth(phantom_subject):
    s = phantom_subject
    truth_every_2mm = torch.from_numpy(s.truth.array[:, :, ::2].transpose(2, 3, 0, 1).astype(np.float64))

    def oracle(left, right, gap_mm, **_):  # the truth halfway between, by position in the dense truth
        n = left.shape[0]
        stride = (truth_every_2mm.shape[0] - 1) // n
        return truth_every_2mm[stride // 2 :: stride][:n]

    result = phantom_per_level(s.sparse, s.truth, s.labels, {"linear": linear_midpoints, "oracle": oracle})
    assert set(result["linear"]) == {"level 1", "level 2", "all new slices"}
    for level in result["oracle"].values():
        assert level["ssim"] == pytest.approx(1.0, abs=1e-6)
    # linear is better at 4 mm (level 2) than between neighbours 8 mm apart (level 1)
    assert result["linear"]["level 2"]["psnr"] > result["linear"]["level 1"]["psnr"]


def test_report_with_an_untrained_residual_model_shows_no_gain(phantom_dir, tmp_path):
    from conftest import write_tiny_weights

    weights = write_tiny_weights(tmp_path / "w", prediction="residual", perturb=False)
    report = evaluate(tmp_path / "ev", phantom=phantom_dir, weights=weights, steps=1, perceptual=False)
    assert report["skipped"] == {"lpips": "not asked for", "rfid": "not asked for"}
    assert report["trained_on"] == ["synthetic"]  # what model.json records
    for methods in report["phantom"].values():
        for level, linear in methods["linear"].items():
            assert methods["calid"][level]["psnr"] == pytest.approx(linear["psnr"], abs=0.05)
    saved = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert saved["phantom"].keys() == report["phantom"].keys()
    assert "| level 1 | calid |" in (tmp_path / "ev" / "report.md").read_text()


@pytest.fixture(scope="module")
def contoured_study(tmp_path_factory):
    from conftest import write_contoured_study

    from bundle.phantom import make_subject

    subject = make_subject(seed=5, size=48, num_slices=5, num_phases=2, pixel_spacing=3.0)
    return write_contoured_study(tmp_path_factory.mktemp("study") / "SYNTH01", subject)


def test_full_report_on_a_contoured_study(contoured_study, tmp_path):
    from bundle.downstream import contour_labels
    from bundle.io import read_sax

    """Every part of the workflow on a Sunnybrook-like folder with tiny random weights: all
    baselines, the steps sweep, downstream segmentation, perceptual metrics, the figure."""
    from conftest import write_tiny_weights

    weights = write_tiny_weights(tmp_path / "w", prediction="residual")
    out = tmp_path / "ev"
    report = evaluate(
        out,
        [contoured_study],
        weights=weights,
        steps=1,
        sweep_steps=[1, 2],
        sweep_phases=1,
        segment_train=[contoured_study],
        segment_iterations=3,
    )
    methods = report["real"]["SYNTH01"]
    assert list(methods) == [
        *("linear", "flow", "flow-phases", "tvl1", "latent-linear", "latent-slerp", "calid", "calid-phases", "calid+")
    ]
    # two phases: nothing to fuse, so fusion over phases leaves both predictors' slices as they were
    for name in ("flow", "calid"):
        assert methods[f"{name}-phases"]["psnr_heart"] == methods[name]["psnr_heart"]
    assert all(m["seconds_per_slice"] > 0 for m in methods.values())
    for metric in ("lpips", "rfid"):  # a figure, or skipped with the reason in the report
        assert all(m[metric] is None for m in methods.values()) == (metric in report["skipped"])
    assert set(report["sweep"]["SYNTH01"]["calid+"]) == {1, 2} and report["sweep_phases"] == [0]
    downstream = report["downstream"]["SYNTH01"]
    assert list(downstream) == ["acquired"] + list(methods)
    stack = read_sax(contoured_study / "dicom")
    labels = contour_labels(contoured_study, stack)
    inner = [key for key in labels if 0 < key[0] < stack.shape[2] - 1]  # only those are predicted
    full = [key for key in labels if labels[key][1] == (1, 2)]  # epicardium at the first phase only
    cavity = downstream["acquired"]["lv_cavity"]
    assert cavity["n"] == len(inner) > len(set(inner) & set(full)) == downstream["acquired"]["lv_myocardium"]["n"]
    assert 0 <= cavity["dice"] <= 1
    assert report["segmenter"] == {"studies": ["SYNTH01"], "slices": len(full), "iterations": 3}
    assert (out / "figures" / "SYNTH01.png").stat().st_size > 1000 and (out / "segmenter.pt").is_file()
    text = (out / "report.md").read_text()
    # rows say whether the study was among those the weights were trained on (model.json)
    assert "gain heart over flow (dB)" in text and "| SYNTH01 (held out) | tvl1 |" in text
    assert (
        "| SYNTH01 (held out) | latent-slerp |" in text and "## DDIM steps, SYNTH01" in text and "## Downstream" in text
    )
    with pytest.raises(Exception, match="holds a report"):  # nothing overwritten
        evaluate(out, [contoured_study])


def test_leave_one_out_tells_predictors_their_neighbours_are_two_slices_apart(phantom_subject):
    seen = []

    def recorder(left, right, gap_mm, **_):
        seen.append(gap_mm)
        return 0.5 * (left + right)

    stack = phantom_subject.sparse  # 8 mm
    leave_one_out(stack, {"recorder": recorder})
    assert seen == [pytest.approx(16.0)]


def test_fused_rows_fuse_the_plain_predictions_without_predicting_again(phantom_subject):
    from bundle.temporal import PhaseFusion, fuse_phases

    calls = []

    class Plain:
        def __call__(self, left, right, gap_mm, **_):
            calls.append(gap_mm)
            return 0.5 * (left + right)

        def describe(self):
            return {"method": "plain"}

    plain, stack = Plain(), phantom_subject.sparse  # 3 phases: a window of 1 phase each side at 0.34
    result, predictions = leave_one_out(stack, {"plain": plain, "fused": PhaseFusion(plain, 0.34, from_mm=0)})
    assert len(calls) == 1
    expected = fuse_phases(torch.from_numpy(predictions["plain"]), 1).numpy()
    np.testing.assert_allclose(predictions["fused"], expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(predictions["fused"], predictions["plain"])
    for scores in result.values():  # each slice's heart scores, inner slices by phases
        assert np.shape(scores["psnr_heart_per_slice"]) == (stack.shape[2] - 2, stack.shape[3])
        assert np.mean(scores["psnr_heart_per_slice"]) == pytest.approx(scores["psnr_heart"], abs=1e-4)
        assert np.mean(scores["ssim_heart_per_slice"]) == pytest.approx(scores["ssim_heart"], abs=1e-4)


def test_labelled_stacks_are_normalised_per_slice_and_scored(phantom_subject, tmp_path):
    """The Sunnybrook ED/ES layout (NAME.nii.gz + NAME_labels.nii.gz, each image windowed on its
    own): every slice is rescaled to its own 99th percentile before any method sees it."""
    from bundle.io import write_nifti
    from bundle.studies import per_slice_normalised_stack

    s = phantom_subject
    uneven = s.sparse.array[..., :1] * np.array([1.0, 3.0, 0.5, 2.0, 1.0, 4.0])[None, None, :, None]
    folder = tmp_path / "stacks"
    write_nifti(SaxStack(uneven, s.sparse.affine, {"was_3d": True}), folder / "P1_phase00.nii.gz")
    labels = SaxStack((s.labels.array[:, :, ::8, :1] == 1).astype(np.uint8), s.sparse.affine, {"was_3d": True})
    write_nifti(labels, folder / "P1_phase00_labels.nii.gz", dtype=np.uint8)
    stack, centre = per_slice_normalised_stack(folder / "P1_phase00.nii.gz")
    np.testing.assert_allclose(np.percentile(stack.array, 99, axis=(0, 1)), 1.0, rtol=1e-6)
    lv = np.argwhere(labels.array[..., 0] > 0)
    assert centre == pytest.approx(tuple(lv[:, :2].mean(0)))
    # a second patient with fewer slices: the mean over stacks of unlike sizes
    write_nifti(SaxStack(uneven[:, :, :5], s.sparse.affine, {"was_3d": True}), folder / "P2_phase00.nii.gz")
    fewer = SaxStack(labels.array[:, :, :5], s.sparse.affine, {"was_3d": True})
    write_nifti(fewer, folder / "P2_phase00_labels.nii.gz", dtype=np.uint8)
    report = evaluate(tmp_path / "ev", labelled_stacks=folder, perceptual=False, reference=False)
    assert list(report["labelled_stacks"]) == ["P1_phase00", "P2_phase00"]
    assert list(report["labelled_stacks"]["P1_phase00"]) == ["linear", "flow", "flow-phases"]
    text = (tmp_path / "ev" / "report.md").read_text()
    assert "mean over 2 stacks" in text and "beats linear in the heart region: flow" in text
    mean_flow = np.mean([v["flow"]["psnr_heart"] for v in report["labelled_stacks"].values()])
    assert f"| {mean_flow:.2f} |" in next(line for line in text.splitlines() if line.startswith("| 2 | flow |"))


def test_the_evaluate_command_takes_the_functions_options(phantom_dir, tmp_path, capsys):
    from bundle.cli import main

    main(["evaluate", str(tmp_path / "ev"), "--phantom", str(phantom_dir), "--noperceptual", "--noreference"])
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert set(report["phantom"]) and "flow" in next(iter(report["phantom"].values()))
    assert "# Evaluation" in capsys.readouterr().out
