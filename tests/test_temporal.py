"""Fusion over phases: a still cine is left as it is; too few phases and narrow gaps are left as
predicted, and the report says so; a moving noisy cine comes closer to its clean truth; a phantom
x2 from 16 mm beats the flow midpoint; the bisection hands it whole cines; the options refuse
what it cannot do; the CLI fuses by default only where it was measured to help."""

import numpy as np
import pytest
import torch
from test_motion import SIZE, disc
from test_upsample_contract import assert_contract

from bundle.errors import InputRefused
from bundle.motion import FlowMidpoints
from bundle.options import UpsampleOptions
from bundle.phantom import make_subject
from bundle.temporal import PhaseFusion, fusable, fuse_phases, fusion_window, why_not_fused
from bundle.upsample import upsample_stack


def moving_disc_cine(phases, noise, seed=0):
    """(1, T, X, Y): a disc going round a circle once over the cine (periodic), clean and noisy."""
    angles = 2 * np.pi * np.arange(phases) / phases
    clean = torch.cat([disc(32 + 6 * np.cos(a), 32 + 6 * np.sin(a), 11) for a in angles], 1)
    rng = torch.Generator().manual_seed(seed)
    return clean, clean + noise * torch.randn(clean.shape, generator=rng, dtype=clean.dtype)


def test_a_still_cine_is_left_as_it_is():
    frame = disc(30, 34, 10) + torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    still = frame.repeat(2, 7, 1, 1)
    fused = fuse_phases(still, window=3)
    assert fused.shape == still.shape and fused.dtype == still.dtype
    np.testing.assert_allclose(fused, still, rtol=0, atol=1e-3)


@pytest.mark.parametrize("phases,window", [(2, 1), (6, 3), (1, 1), (5, 0)])
def test_too_few_phases_are_left_as_they_are(phases, window):
    _, cine = moving_disc_cine(phases, noise=10.0)
    assert not fusable(phases, window)
    assert torch.equal(fuse_phases(cine, window), cine)


@pytest.mark.parametrize(
    "phases,fraction,window", [(20, 0.15, 3), (10, 0.15, 1), (30, 0.15, 4), (2, 0.15, 0), (6, 0.15, 0), (10, 0.2, 2)]
)
def test_the_window_is_the_phases_within_the_fraction_of_the_cycle(phases, fraction, window):
    assert fusion_window(phases, fraction) == window


@pytest.mark.parametrize(
    "phases,gap_mm,reason",
    [(2, 20.0, "2 phases"), (12, 8.0, "neighbours 8 mm apart"), (12, 15.9999, None), (12, None, None)],
    ids=["ed-es pair", "narrow gap", "16 mm within tolerance", "unknown gap"],
)
def test_what_is_left_as_predicted_is_said(phases, gap_mm, reason):
    _, cine = moving_disc_cine(phases, noise=10.0)
    inner = FlowMidpoints()
    predictor = PhaseFusion(FlowMidpoints(), 0.15)
    plain, fused = inner(cine, cine.roll(1, dims=-1), gap_mm), predictor(cine, cine.roll(1, dims=-1), gap_mm)
    assert why_not_fused(phases, gap_mm) == reason
    assert torch.equal(fused, plain) == (reason is not None)
    assert predictor.describe().get("phase_fusion_left_out") == ([reason] if reason else None)


def test_a_noisy_moving_cine_comes_closer_to_its_clean_truth():
    clean, noisy = moving_disc_cine(phases=12, noise=15.0)
    fused = fuse_phases(noisy, window=2)
    error_before = (noisy - clean).pow(2).mean()
    error_after = (fused - clean).pow(2).mean()
    # averaging five phases unregistered would smear the moving edge instead
    smeared = sum(noisy.roll(k, dims=1) for k in range(-2, 3)) / 5
    assert error_after < 0.5 * error_before
    assert error_after < 0.5 * (smeared - clean).pow(2).mean()


def test_phantom_x2_from_16_mm_beats_the_flow_midpoint_against_its_dense_truth():
    subject = make_subject(
        seed=2, size=64, num_slices=5, num_phases=10, pixel_spacing=2.5, noise=0.05, sparse_spacing=16.0
    )
    truth = subject.truth.array[:, :, 4::8]  # the dense truth half way between the acquired slices
    lo, hi = np.percentile(subject.sparse.array, [0.5, 99.5])

    def psnr_of_new_slices(predictor):
        new = upsample_stack(subject.sparse, 2, predictor).array[:, :, 1::2]
        return -10 * np.log10((((new - truth) / (hi - lo)) ** 2).mean())

    flow, fused = psnr_of_new_slices(FlowMidpoints()), psnr_of_new_slices(PhaseFusion(FlowMidpoints()))
    assert fused > flow + 0.15  # measured +0.30 dB (10 phases: one each side)


def test_bisection_hands_it_whole_cines_and_keeps_the_contract(phantom_subject):
    calls = []

    class Recorder(FlowMidpoints):
        def __call__(self, left, right, gap_mm=None, phase_offset=0):
            calls.append(left.shape[1])
            return super().__call__(left, right, gap_mm, phase_offset)

    stack = phantom_subject.sparse  # 3 phases: a third of the cycle fuses one phase each side
    predictor = PhaseFusion(Recorder(), 0.34, from_mm=0)
    dense = upsample_stack(stack, 4, predictor, phase_chunk=1)
    assert_contract(stack, dense, 4)
    assert calls == [stack.shape[3]] * 2  # two levels, every phase at once despite phase_chunk=1
    assert predictor.describe() == {"method": "flow", "generated_slices": predictor.fused, "phase_fusion": 0.34}
    assert predictor.fused == (stack.shape[2] - 1) * (1 + 2) * stack.shape[3]


def test_options_check_the_phase_fusion():
    assert UpsampleOptions(phase_fusion="0.2").phase_fusion == 0.2  # a bundle override arrives as a string
    assert UpsampleOptions(method="linear").phase_fusion == 0.15  # the default, not used by linear
    for bad in (-0.1, 0.5, "a lot", True):
        with pytest.raises(InputRefused, match="phase fusion must be a fraction"):
            UpsampleOptions(phase_fusion=bad)
    with pytest.raises(InputRefused, match="linear interpolation does not fuse phases"):
        UpsampleOptions(method="linear", phase_fusion=0.3)


def test_cli_fuses_by_default_between_far_neighbours_only(phantom_subject, tmp_path):
    from bundle.cli import main
    from bundle.io import read_sax, write_nifti

    sparse_16mm = make_subject(seed=3, size=48, num_slices=4, num_phases=7, pixel_spacing=3.0, sparse_spacing=16.0)
    for name, stack in (("8mm", phantom_subject.sparse), ("16mm", sparse_16mm.sparse)):
        write_nifti(stack, tmp_path / f"{name}.nii.gz")
        for how in ("default", "off"):
            extra = ["--phase-fusion", "0"] if how == "off" else []
            out = tmp_path / f"{name}_{how}.nii.gz"
            main(["upsample", str(tmp_path / f"{name}.nii.gz"), str(out), "--method", "flow", *extra])
    narrow = [read_sax(tmp_path / f"8mm_{how}.nii.gz").array for how in ("default", "off")]
    np.testing.assert_array_equal(*narrow)  # 8 and 4 mm gaps: flow, as predicted
    stack = read_sax(tmp_path / "16mm.nii.gz")
    fused, plain = read_sax(tmp_path / "16mm_default.nii.gz"), read_sax(tmp_path / "16mm_off.nii.gz")
    assert_contract(stack, fused, 4)
    expected = upsample_stack(stack, 4, PhaseFusion(FlowMidpoints())).array
    np.testing.assert_allclose(fused.array, expected, rtol=1e-5, atol=1e-3)
    assert np.abs(fused.array - plain.array).max() > 1.0  # the 16 mm level was fused
    np.testing.assert_array_equal(fused.array[:, :, ::4], plain.array[:, :, ::4])  # acquired slices untouched
