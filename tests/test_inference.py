"""Learned upsampling: output contract, batching, determinism, samples, weights errors."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from test_upsample_contract import assert_contract

from bundle.cli import main
from bundle.errors import InputRefused
from bundle.inference import LearnedMidpoints
from bundle.io import read_sax, write_nifti
from bundle.motion import FlowMidpoints
from bundle.pipeline import std_map_path, upsample_file
from bundle.stack import SaxStack
from bundle.transforms import SlicePreprocessor
from bundle.upsample import bisect, upsample_stack
from bundle.weights import load_model


@pytest.fixture(scope="module")
def small_stack(phantom_subject):
    """An odd in-plane size (not a multiple of the network's) exercises the padding."""
    s = phantom_subject.sparse
    return SaxStack(s.array[1:31, 2:30, :4, :2], s.affine, dict(s.meta))


def predictor(weights, stack, chunk_size, seed=0, refine=False, steps=2):
    model = load_model(weights)
    pre = model.preprocessor(stack)
    return LearnedMidpoints(model, pre, num_steps=steps, refine=refine, seed=seed, chunk_size=chunk_size)


@pytest.mark.parametrize("weights", ["tiny_weights_2d", "tiny_weights_2dt"], ids=["2D", "2D+T"])
def test_batched_equals_slice_by_slice(request, small_stack, weights):
    weights = request.getfixturevalue(weights)
    slices = torch.from_numpy(small_stack.array.transpose(2, 3, 0, 1).astype(np.float64))
    batched = bisect(slices, 4, predictor(weights, small_stack, chunk_size=64))
    looped = bisect(slices, 4, predictor(weights, small_stack, chunk_size=1))
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-2)  # scanner units: range about 0..1200
    assert not torch.equal(batched[1], 0.5 * (slices[0] + slices[1]))  # it is not linear


@pytest.mark.parametrize("weights", ["tiny_weights_2d", "tiny_weights_2dt"], ids=["2D", "2D+T"])
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_output_contract_4d(request, small_stack, tmp_path, weights, factor):
    weights = request.getfixturevalue(weights)
    write_nifti(small_stack, tmp_path / "in.nii.gz")
    stack, dense, _ = upsample_file(
        tmp_path / "in.nii.gz",
        tmp_path / "out.nii.gz",
        factor=factor,
        method="calid",
        weights=weights,
        steps=1,
    )
    assert_contract(read_sax(tmp_path / "in.nii.gz"), read_sax(tmp_path / "out.nii.gz"), factor)
    assert np.isfinite(dense.array).all()


@pytest.mark.parametrize("weights", ["tiny_weights_2d", "tiny_weights_2dt"], ids=["2D", "2D+T"])
def test_output_contract_3d_input(request, small_stack, tmp_path, weights):
    weights = request.getfixturevalue(weights)
    three_d = SaxStack(small_stack.array[..., :1], small_stack.affine, {"was_3d": True})
    write_nifti(three_d, tmp_path / "in.nii.gz")
    upsample_file(tmp_path / "in.nii.gz", tmp_path / "out.nii.gz", factor=4, method="calid", weights=weights, steps=1)
    assert nib.load(tmp_path / "out.nii.gz").ndim == 3
    assert_contract(read_sax(tmp_path / "in.nii.gz"), read_sax(tmp_path / "out.nii.gz"), 4)


def test_refine_meets_the_contract(small_stack, tmp_path, tiny_weights_2d):
    write_nifti(small_stack, tmp_path / "in.nii.gz")
    upsample_file(
        tmp_path / "in.nii.gz",
        tmp_path / "o.nii.gz",
        factor=2,
        method="calid",
        weights=tiny_weights_2d,
        refine=True,
        steps=2,
    )
    assert_contract(small_stack, read_sax(tmp_path / "o.nii.gz"), 2)


def test_seed_determinism_and_samples(small_stack, tmp_path, tiny_weights_2d):
    write_nifti(small_stack, tmp_path / "in.nii.gz")
    run = dict(factor=2, method="calid", weights=tiny_weights_2d, steps=2)
    a = upsample_file(tmp_path / "in.nii.gz", tmp_path / "a.nii.gz", seed=1, **run)[1].array
    b = upsample_file(tmp_path / "in.nii.gz", tmp_path / "b.nii.gz", seed=1, **run)[1].array
    c = upsample_file(tmp_path / "in.nii.gz", tmp_path / "c.nii.gz", seed=2, **run)[1].array
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:, :, 1::2], c[:, :, 1::2])
    stack, mean, _ = upsample_file(tmp_path / "in.nii.gz", tmp_path / "m.nii.gz", seed=1, samples=3, **run)
    std_path = std_map_path(tmp_path / "m.nii.gz")
    assert std_path.name == "m_std.nii.gz"
    std = read_sax(std_path)
    assert_contract(small_stack, read_sax(tmp_path / "m.nii.gz"), 2)
    np.testing.assert_allclose(std.affine, mean.affine)
    assert std.shape == mean.shape
    assert np.all(std.array[:, :, ::2] == 0) and std.array[:, :, 1::2].max() > 0


def test_missing_and_incompatible_weights(small_stack, tmp_path, tiny_weights_2d, capsys):
    write_nifti(small_stack, tmp_path / "in.nii.gz")
    with pytest.raises(InputRefused, match="missing model.pt, model.json"):
        load_model(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_weights_2d, broken)
    info = json.loads((broken / "model.json").read_text())
    info["net"]["unet_channels"] = [16, 48]
    (broken / "model.json").write_text(json.dumps(info))
    with pytest.raises(InputRefused, match="model.pt does not fit the network"):
        load_model(broken)
    with pytest.raises(SystemExit):
        main(
            [
                "upsample",
                str(tmp_path / "in.nii.gz"),
                str(tmp_path / "o.nii.gz"),
                "--method",
                "calid",
                "--weights",
                str(tmp_path / "x"),
            ]
        )
    assert "no CaLID weights in" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()
    refused = tmp_path / "refused"  # a record the bundle refuses: refused before the output folder is made
    shutil.copytree(tiny_weights_2d, refused)
    info = json.loads((refused / "model.json").read_text())
    (refused / "model.json").write_text(
        json.dumps({**info, "net": {**info["net"], "latent_inputs": True}, "prediction": "epsilon"})
    )
    with pytest.raises(SystemExit):
        main(
            [
                "upsample",
                str(tmp_path / "in.nii.gz"),
                str(tmp_path / "new" / "o.nii.gz"),
                "--method",
                "calid",
                "--weights",
                str(refused),
            ]
        )
    assert "latent_inputs needs prediction residual" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_cli_and_bundle_inference_share_the_code(small_stack, tmp_path, tiny_weights_2d):
    from conftest import ROOT
    from monai.bundle import ConfigWorkflow

    write_nifti(small_stack, tmp_path / "in.nii.gz")
    main(
        ["upsample", str(tmp_path / "in.nii.gz"), str(tmp_path / "cli.nii.gz"), "--factor", "2", "--method", "calid",
         "--weights", str(tiny_weights_2d), "--steps", "2", "--seed", "3", "--preview", str(tmp_path / "p.png")]
    )  # fmt: skip
    wf = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "inference.json"),
        workflow_type=None,
        bundle_root=str(ROOT),
        input_path=str(tmp_path / "in.nii.gz"),
        output_path=str(tmp_path / "cfg.nii.gz"),
        factor=2,
        method="calid",
        steps=2,
        seed=3,
        weights=str(tiny_weights_2d),
    )
    wf.initialize()
    wf.run()
    np.testing.assert_array_equal(read_sax(tmp_path / "cli.nii.gz").array, read_sax(tmp_path / "cfg.nii.gz").array)
    assert (tmp_path / "p.png").stat().st_size > 500


def test_untrained_residual_model_upsamples_as_linear(small_stack, tmp_path):
    """Through the whole pipeline (scaling, padding, bisection), a residual model whose output
    conv is still zero reproduces linear interpolation."""
    from conftest import write_tiny_weights

    weights = write_tiny_weights(tmp_path / "w", prediction="residual", perturb=False)
    write_nifti(small_stack, tmp_path / "in.nii.gz")
    _, learned, _ = upsample_file(
        tmp_path / "in.nii.gz", tmp_path / "a.nii.gz", factor=4, method="calid", weights=weights
    )
    _, linear, _ = upsample_file(tmp_path / "in.nii.gz", tmp_path / "b.nii.gz", factor=4, method="linear")
    np.testing.assert_allclose(learned.array, linear.array, rtol=0, atol=1e-3)


def test_phase_chunks_do_not_change_the_result(small_stack, tiny_weights_2d):
    from bundle.upsample import upsample_stack

    whole = upsample_stack(small_stack, 4, predictor(tiny_weights_2d, small_stack, chunk_size=8))
    by_phase = upsample_stack(small_stack, 4, predictor(tiny_weights_2d, small_stack, chunk_size=8), phase_chunk=1)
    np.testing.assert_allclose(whole.array, by_phase.array, rtol=1e-5, atol=1e-2)


def test_samples_mean_and_std_match_the_draws(small_stack, tmp_path, tiny_weights_2d):
    from bundle.upsample import upsample_stack

    write_nifti(small_stack, tmp_path / "in.nii.gz")
    model = load_model(tiny_weights_2d)
    pre = model.preprocessor(small_stack)
    draws = [
        upsample_stack(small_stack, 2, LearnedMidpoints(model, pre, num_steps=2, seed=5, sample=i)).array
        for i in range(3)
    ]
    _, mean, _ = upsample_file(
        tmp_path / "in.nii.gz",
        tmp_path / "m.nii.gz",
        factor=2,
        method="calid",
        weights=tiny_weights_2d,
        steps=2,
        seed=5,
        samples=3,
    )
    np.testing.assert_allclose(mean.array, np.mean(draws, 0), rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(
        read_sax(std_map_path(tmp_path / "m.nii.gz")).array, np.std(draws, 0), rtol=1e-4, atol=1e-2
    )


def test_fallback_to_flow_below_the_models_narrowest_gap(tmp_path, phantom_subject):
    from conftest import write_tiny_weights

    weights = write_tiny_weights(tmp_path / "w")  # perturbed: the model differs from linear
    info = json.loads((weights / "model.json").read_text())
    (weights / "model.json").write_text(json.dumps({**info, "fallback_below_mm": 6.0}))
    model = load_model(weights)
    stack = phantom_subject.sparse  # 8 mm slices: level 0 gaps are 8 mm, level 1 gaps 4 mm
    pre = SlicePreprocessor.for_stack(stack, None, model.size_multiple)
    predictor = LearnedMidpoints(model, pre, num_steps=1)
    slices = torch.from_numpy(stack.array.transpose(2, 3, 0, 1).astype(np.float64))
    left, right = slices[:2, :1], slices[1:3, :1]
    flow = FlowMidpoints()(left, right, 4.0)
    assert torch.equal(predictor(left, right, 4.0), flow)
    assert not torch.allclose(predictor(left, right, 8.0), flow, atol=1e-3)
    assert predictor.fell_back == {4.0}
    assert "flow midpoints between neighbours 4 mm apart" in predictor.describe()["notes"][0]  # the log says
    unrestricted = LearnedMidpoints(model, pre, num_steps=1, fallback=False)
    assert not torch.allclose(unrestricted(left, right, 4.0), flow, atol=1e-3)
    through_engine = LearnedMidpoints(model, pre, num_steps=1)
    upsample_stack(stack, 4, through_engine)  # the engine tells each level's gap: 8 mm, then 4 mm
    assert through_engine.describe()["fallback_gaps_mm"] == [pytest.approx(4.0)]


def test_gap_at_the_fallback_threshold_within_rounding_uses_the_model(tmp_path, phantom_subject):
    """Real spacings come out as 15.9999 mm: that is the 16 mm the model was measured at."""
    from conftest import write_tiny_weights

    weights = write_tiny_weights(tmp_path / "w")
    info = json.loads((weights / "model.json").read_text())
    (weights / "model.json").write_text(json.dumps({**info, "fallback_below_mm": 16.0}))
    model = load_model(weights)
    pre = SlicePreprocessor.for_stack(phantom_subject.sparse, None, model.size_multiple)
    predictor = LearnedMidpoints(model, pre, num_steps=1)
    assert not predictor.falls_back(15.9999) and predictor.falls_back(15.9999 / 2)
    assert predictor.falls_back(15.5)  # 3 % narrower: not rounding


@pytest.mark.parametrize("value", [0.0, 37.0])
def test_constant_and_tiny_stacks_stay_within_the_neighbours_range(tmp_path, tiny_weights_2d, value):
    rng = np.random.default_rng(0)
    for array in (np.full((16, 16, 3, 2), value), rng.random((8, 8, 3, 2)) * 100 + value):
        stack = SaxStack(array, np.diag([1.5, 1.5, 8.0, 1.0]))
        model = load_model(tiny_weights_2d)
        pre = model.preprocessor(stack)
        dense = upsample_stack(stack, 4, LearnedMidpoints(model, pre, num_steps=2)).array
        assert np.isfinite(dense).all()
        for k in range(2):  # every new slice within the range of the acquired slices around it
            pair = array[:, :, k : k + 2]
            new = dense[:, :, 4 * k + 1 : 4 * k + 4]
            low, high = pair.min(axis=(0, 1, 2)), pair.max(axis=(0, 1, 2))
            assert (new >= low - 1e-4).all() and (new <= high + 1e-4).all()


def test_the_progress_bar_counts_only_the_slices_the_model_generates(tmp_path, phantom_subject):
    from conftest import write_tiny_weights

    from bundle.pipeline import BisectionInferer

    weights = write_tiny_weights(tmp_path / "w")
    info = json.loads((weights / "model.json").read_text())
    (weights / "model.json").write_text(json.dumps({**info, "fallback_below_mm": 6.0}))
    stack = phantom_subject.sparse  # 8 mm: level 0 by the model, level 1 (4 mm) by flow
    z, t = stack.shape[2:]
    inferer = BisectionInferer(factor=4, method="calid", steps=1, samples=2, weights=str(weights), device="cpu")
    predictors = inferer.predictors(stack, progress=False)
    assert predictors[0].progress is predictors[1].progress
    assert predictors[0].progress.total == (z - 1) * t * 2  # level 0 only, both samples
