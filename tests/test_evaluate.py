"""Evaluation against fixed interpolation: the protocol's arithmetic on known answers."""

import json

import numpy as np
import pytest
import torch

from bundle.evaluate import evaluate, heart_box, leave_one_out, phantom_per_level
from bundle.io import SaxStack
from bundle.upsample import linear_midpoints


def test_heart_box_stays_inside_the_image():
    stack = SaxStack(np.zeros((100, 60, 3, 1)), np.diag([2.0, 2.0, 8.0, 1.0]))
    assert heart_box(stack, (50, 30), heart_mm=40) == (40, 60, 20, 40)
    assert heart_box(stack, (2, 58), heart_mm=40) == (0, 20, 40, 60)
    assert heart_box(stack, None, heart_mm=400) == (0, 100, 0, 60)


def test_leave_one_out_scores_the_right_slices(phantom_subject):
    stack = phantom_subject.sparse

    def oracle(left, right, level):  # knows the answer: the acquired middle slices
        slices = torch.from_numpy(stack.array.transpose(2, 3, 0, 1).astype(np.float64))
        return slices[1:-1]

    result = leave_one_out(stack, {"linear": linear_midpoints, "oracle": oracle})
    assert result["oracle"]["ssim"] == pytest.approx(1.0, abs=1e-6) and result["oracle"]["psnr"] > 80
    assert 10 < result["linear"]["psnr"] < 40 and result["linear"]["ssim"] < 1


def test_phantom_levels_against_the_truth(phantom_subject):
    s = phantom_subject
    truth_every_2mm = torch.from_numpy(s.truth.array[:, :, ::2].transpose(2, 3, 0, 1).astype(np.float64))

    def oracle(left, right, level, **_):  # the truth halfway between, by position in the dense truth
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
    report = evaluate(tmp_path / "ev", phantom_dir=phantom_dir, weights_dir=weights, steps=1)
    for methods in report["phantom"].values():
        for level, linear in methods["linear"].items():
            assert methods["calid"][level]["psnr"] == pytest.approx(linear["psnr"], abs=0.05)
    saved = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert saved["phantom"].keys() == report["phantom"].keys()
    assert "| level 1 | calid |" in (tmp_path / "ev" / "report.md").read_text()
