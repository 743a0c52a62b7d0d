"""Motion-compensated midpoints: shapes with a known half-way answer, symmetry, batching,
determinism, degenerate slices, and the output contract through the CLI."""

import numpy as np
import pytest
import torch
from test_upsample_contract import assert_contract

from bundle.cli import main
from bundle.io import read_sax
from bundle.motion import FlowMidpoints, FlowSettings, flow_midpoint, pairs_per_chunk, warp
from bundle.upsample import linear_midpoints

SIZE = 64


def disc(cx, cy, radius, size=SIZE):
    """A bright disc on a darker background with a one-pixel soft edge (as an MR image has)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    edge = np.clip(radius + 0.5 - np.hypot(xx - cx, yy - cy), 0, 1)
    return torch.from_numpy(20.0 + 180.0 * edge)[None, None]


def dice(pred, truth, threshold=110.0):
    p, t = pred > threshold, truth > threshold
    return float(2 * (p & t).sum() / (p.sum() + t.sum()))


@pytest.mark.parametrize(
    "left,right,middle",
    [
        ((26, 32, 11), (38, 32, 11), (32, 32, 11)),  # shifted 12 px (15 mm at 1.25 mm pixels)
        ((32, 30, 8), (32, 34, 14), (32, 32, 11)),  # moved and dilated
    ],
    ids=["shifted", "dilated"],
)
def test_midpoint_of_a_moving_disc_is_the_half_way_disc(left, right, middle):
    a, b, truth = disc(*left), disc(*right), disc(*middle)
    mid, weight = flow_midpoint(a, b)
    assert dice(mid, truth) >= 0.95
    assert dice(mid, truth) > dice(0.5 * (a + b), truth) + 0.05  # linear doubles the edges instead
    assert mid.shape == a.shape and weight.min() >= 0 and weight.max() <= 1


def test_identical_neighbours_give_that_slice():
    a = disc(30, 33, 10) + torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    mid, _ = flow_midpoint(a, a.clone())
    assert torch.equal(mid, a.float())


def test_swapping_the_neighbours_gives_the_same_midpoint():
    a, b = disc(26, 30, 10), disc(37, 35, 12)
    np.testing.assert_allclose(flow_midpoint(a, b)[0], flow_midpoint(b, a)[0], rtol=0, atol=1e-5)


def test_batched_equals_pair_by_pair_and_runs_are_identical():
    rng = np.random.default_rng(1)
    pairs = [(disc(*rng.uniform(24, 40, 2), rng.uniform(6, 14)), disc(*rng.uniform(24, 40, 2), 10)) for _ in range(5)]
    left = torch.cat([p[0] for p in pairs]).reshape(5, 1, SIZE, SIZE).double()
    right = torch.cat([p[1] for p in pairs]).reshape(5, 1, SIZE, SIZE).double()
    batched = FlowMidpoints(memory_budget_mb=64)(left, right)
    one_by_one = FlowMidpoints(memory_budget_mb=1)  # one pair per chunk
    assert pairs_per_chunk(SIZE, SIZE, one_by_one.memory_budget_mb) == 1
    looped = one_by_one(left, right)
    assert batched.dtype == left.dtype and batched.shape == left.shape
    np.testing.assert_allclose(batched, looped, rtol=1e-4, atol=1e-3)  # float32 rounding only
    assert torch.equal(FlowMidpoints(memory_budget_mb=64)(left, right), batched)
    assert one_by_one.describe() == {"method": "flow", "generated_slices": 5}


@pytest.mark.parametrize(
    "a,b",
    [
        (torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32)),
        (torch.full((2, 1, 32, 32), 7.0), torch.full((2, 1, 32, 32), 3.0)),
        (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.zeros(2, 1, 8, 8)),
        (torch.rand(1, 1, 3, 2, generator=torch.Generator().manual_seed(3)), torch.ones(1, 1, 3, 2)),
        (torch.full((1, 1, 16, 16), 1e30), torch.zeros(1, 1, 16, 16)),
    ],
    ids=["zero", "constant", "tiny", "smallest", "huge"],
)
def test_degenerate_slices_give_finite_midpoints_within_the_neighbours_range(a, b):
    mid, _ = flow_midpoint(a, b)
    assert torch.isfinite(mid).all()
    low, high = torch.minimum(a.min(), b.min()), torch.maximum(a.max(), b.max())
    assert mid.min() >= low - 1e-6 * high.abs() and mid.max() <= high * (1 + 1e-6) + 1e-6


def test_warp_convention():
    """warp(img, flow)(x) = img(x + flow(x)): a shift of +2 along the second axis reads 2 pixels on."""
    img = torch.arange(64.0).reshape(1, 1, 8, 8)
    flow = torch.zeros(1, 2, 8, 8)
    flow[:, 1] = 2.0
    np.testing.assert_allclose(warp(img, flow)[0, 0, :, :6], img[0, 0, :, 2:], atol=1e-4)


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="attachment"):
        FlowSettings(attachment=0)
    with pytest.raises(ValueError, match="iterations"):
        FlowSettings(iterations=0)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        FlowMidpoints(memory_budget_mb=0)


def test_flow_beats_linear_against_the_phantoms_dense_truth():
    """x4 from 8 mm at 1.5 mm pixels, a known answer: in the heart region flow must beat linear at
    both bisection levels (measured: +0.65 and +0.95 dB PSNR, +0.04 and +0.05 SSIM)."""
    from bundle.evaluate import phantom_per_level
    from bundle.phantom import make_subject

    s = make_subject(seed=3, size=96, num_slices=6, num_phases=2, pixel_spacing=1.5)
    result = phantom_per_level(s.sparse, s.truth, s.labels, {"linear": linear_midpoints, "flow": FlowMidpoints()})
    for level in ("level 1", "level 2"):
        flow, linear = result["flow"][level], result["linear"][level]
        assert flow["psnr_heart"] > linear["psnr_heart"] + 0.4
        assert flow["ssim_heart"] > linear["ssim_heart"] + 0.02


@pytest.mark.parametrize("factor", [2, 4])
def test_cli_flow_meets_the_contract(phantom_subject, tmp_path, factor, capsys):
    from bundle.io import write_nifti

    write_nifti(phantom_subject.sparse, tmp_path / "in.nii.gz")
    main(
        [
            "upsample",
            str(tmp_path / "in.nii.gz"),
            str(tmp_path / "out.nii.gz"),
            "--factor",
            str(factor),
            "--method",
            "flow",
        ]
    )
    dense = read_sax(tmp_path / "out.nii.gz")
    assert_contract(read_sax(tmp_path / "in.nii.gz"), dense, factor)
    assert np.isfinite(dense.array).all()
    assert f"(flow, x{factor})" in capsys.readouterr().out


def test_the_default_is_the_shipped_model_with_flow_between_close_neighbours(phantom_subject, tmp_path, capsys, caplog):
    """The default method is calid with the shipped weights; the phantom's 8 mm gaps are below
    their fallback_below_mm (16), so every new slice is the flow midpoint, and the user is told."""
    from bundle.io import write_nifti

    write_nifti(phantom_subject.sparse, tmp_path / "in.nii.gz")
    main(["upsample", str(tmp_path / "in.nii.gz"), str(tmp_path / "default.nii.gz"), "--factor", "2"])
    out = capsys.readouterr().out
    main(["upsample", str(tmp_path / "in.nii.gz"), str(tmp_path / "flow.nii.gz"), "--factor", "2", "--method", "flow"])
    assert "(calid, 1 steps, x2)" in out
    assert "flow midpoints between neighbours 8 mm apart" in caplog.text
    np.testing.assert_array_equal(read_sax(tmp_path / "default.nii.gz").array, read_sax(tmp_path / "flow.nii.gz").array)


def test_cli_refuses_model_options_with_flow(phantom_subject, tmp_path, capsys):
    from bundle.io import write_nifti

    write_nifti(phantom_subject.sparse, tmp_path / "in.nii.gz")
    for extra in (["--steps", "4"], ["--refine"], ["--weights", "models"], ["--samples", "3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["upsample", str(tmp_path / "in.nii.gz"), str(tmp_path / "o.nii.gz"), "--method", "flow", *extra])
        assert exit_info.value.code == 2
        assert "calid" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()
