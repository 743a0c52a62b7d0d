"""Test-time adaptation (--adapt): what it trains on, what it changes, what it refuses."""

import numpy as np
import pytest
import torch
from conftest import write_tiny_weights

from bundle.adapt import LeaveOneOutAdapted, adapt_model, adapting_head
from bundle.errors import InputRefused
from bundle.networks import CaLIDNetwork, preset
from bundle.options import UpsampleOptions
from bundle.pipeline import BisectionInferer
from bundle.stack import every_nth_slice, voxel_to_world
from bundle.weights import CaLIDModel, ModelInfo


def tiny_model_over_flow(seed=0, head=False, start="mean"):
    torch.manual_seed(seed)
    net = dict(preset("tiny"), conditioning_channels=4, gap_classes=64)
    if head:
        net["flow_correction"] = [4, 4, 8, 8, 8, 4]
    info = ModelInfo("model", 2, net, preset="tiny", latent_scale=1.3, base="flow", start=start, steps=1)
    network = CaLIDNetwork.from_info(info).eval()
    for p in network.denoiser.unet.out.parameters():
        torch.nn.init.normal_(p, std=0.05)  # a correction that is not zero
    return CaLIDModel(network, info, "test")


def adapted_twice(model, stack, trained):
    """Two 3-step adaptations: the given model untouched, the two equal, only ``trained`` changed
    (the VAE always frozen), the copy left frozen for inference; returns the state before and one
    copy's."""
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    runs = [adapt_model(model, stack, 3, seed=7, progress=False) for _ in range(2)]
    after = [r.network.state_dict() for r in runs]
    for key, value in before.items():
        assert torch.equal(model.network.state_dict()[key], value), f"the given model changed: {key}"
        assert torch.equal(after[0][key], after[1][key]), f"not deterministic: {key}"
    changed = [k for k in before if not torch.equal(after[0][k], before[k])]
    assert changed and all(k.startswith(f"{trained}.") for k in changed)
    z, t = stack.shape[2:]
    assert runs[0].adaptation["trained"] == trained and runs[0].adaptation["steps"] == 3
    assert runs[0].adaptation["triplets"] == (z - 2) * t
    assert not runs[0].network.training and not any(p.requires_grad for p in runs[0].network.parameters())
    return before, after[0]


def test_adapting_fine_tunes_a_copy_deterministically(phantom_subject):
    adapted_twice(tiny_model_over_flow(), phantom_subject.sparse, "denoiser")


def test_adapting_weights_with_a_head_trains_the_head_alone(phantom_subject):
    """Through the frozen denoiser, as the head was trained."""
    model, stack = tiny_model_over_flow(head=True), phantom_subject.sparse
    before, after = adapted_twice(model, stack, "flow_correction")
    # the adaptation's step 0 is the model as given, and its step 3 what adapt_model returns
    steps = adapting_head(model, stack, seed=7)
    step, first = next(steps)
    assert step == 0 and all(torch.equal(v, before[k]) for k, v in first.network.state_dict().items())
    for step, adapted in steps:
        if step == 3:
            break
    assert all(torch.equal(v, after[k]) for k, v in adapted.network.state_dict().items())


def test_adapt_refuses_before_any_work(tmp_path, phantom_subject):
    with pytest.raises(InputRefused, match="adapt is for method calid"):
        UpsampleOptions(method="flow", adapt=10)
    with pytest.raises(InputRefused, match="adapt must be a whole number"):
        UpsampleOptions(method="calid", adapt=-1)
    over_linear = write_tiny_weights(tmp_path / "linear", prediction="residual")
    inferer = BisectionInferer(method="calid", adapt=2, weights=str(over_linear), device="cpu")
    with pytest.raises(InputRefused, match="adapt needs a 2D model that corrects the flow midpoint"):
        inferer(phantom_subject.sparse, progress=False)
    with pytest.raises(InputRefused, match="adapt trains a flow-correction head from the mean start"):
        adapt_model(tiny_model_over_flow(head=True, start="noise"), phantom_subject.sparse, 2, progress=False)
    two_slices = every_nth_slice(phantom_subject.sparse, 0, 3)
    with pytest.raises(InputRefused, match="at least 3 slices"):
        adapt_model(tiny_model_over_flow(), two_slices, 2, progress=False)


def test_the_upsampled_stack_says_how_it_was_adapted(phantom_subject):
    model = tiny_model_over_flow()
    stack = phantom_subject.sparse
    dense, _ = BisectionInferer(method="calid", factor=2, adapt=2, device="cpu")(stack, network=model, progress=False)
    assert dense.meta["adaptation"]["steps"] == 2 and dense.meta["adaptation"]["seconds"] >= 0
    np.testing.assert_array_equal(dense.array[:, :, ::2], stack.array)
    plain, _ = BisectionInferer(method="calid", factor=2, device="cpu")(stack, network=model, progress=False)
    assert "adaptation" not in plain.meta and not np.allclose(plain.array, dense.array)


def test_a_stack_the_model_never_fills_is_not_adapted(phantom_subject, caplog):
    """Where flow fills every gap (all below fallback_below_mm), adapting would cost minutes for nothing."""
    model = tiny_model_over_flow(head=True)
    stack = phantom_subject.sparse
    model.info = model.info.updated(fallback_below_mm=4 * stack.slice_spacing)
    dense, _ = BisectionInferer(method="calid", factor=4, adapt=2, device="cpu")(stack, network=model, progress=False)
    assert "adaptation" not in dense.meta and "--adapt: not adapted" in caplog.text
    model.info = model.info.updated(fallback_below_mm=stack.slice_spacing)  # the first level is the model's
    dense, _ = BisectionInferer(method="calid", factor=4, adapt=2, device="cpu")(stack, network=model, progress=False)
    assert dense.meta["adaptation"]["steps"] == 2


def test_every_nth_slice_keeps_each_slice_where_it_was(phantom_subject):
    stack = phantom_subject.sparse
    odd = every_nth_slice(stack, 1, 2)
    assert odd.shape[2] == len(range(1, stack.shape[2], 2))
    np.testing.assert_array_equal(odd.array, stack.array[:, :, 1::2])
    for k in range(odd.shape[2]):
        np.testing.assert_allclose(
            voxel_to_world(odd.affine, [3, 5, k]), voxel_to_world(stack.affine, [3, 5, 1 + 2 * k])
        )
    assert odd.slice_spacing == pytest.approx(2 * stack.slice_spacing)


def test_leave_one_out_adaptation_never_sees_the_slice_it_is_scored_on(monkeypatch, phantom_subject):
    """Slices between even neighbours come from the model adapted on the even slices alone."""
    import bundle.adapt

    stack = phantom_subject.sparse
    seen = []

    def fake_adapt(model, sub, steps, device="cpu", seed=0, progress=True):
        seen.append(sub.array.copy())
        return len(seen) - 1  # the parity stands in for the adapted model

    monkeypatch.setattr(bundle.adapt, "adapt_model", fake_adapt)
    predictor = LeaveOneOutAdapted(
        stack, None, 5, make=lambda parity: lambda left, right, g, p: torch.full_like(left, parity)
    )
    np.testing.assert_array_equal(seen[0], stack.array[:, :, 0::2])
    np.testing.assert_array_equal(seen[1], stack.array[:, :, 1::2])
    slices = torch.from_numpy(stack.array.transpose(2, 3, 0, 1).astype(np.float64))
    out = predictor(slices[:-2], slices[2:], 2 * stack.slice_spacing)
    # row i predicts slice i + 1 from slices i and i + 2: the model of parity i % 2, which never saw slice i + 1
    assert [int(out[i].flatten()[0]) for i in range(len(out))] == [i % 2 for i in range(len(out))]


def test_evaluate_reports_the_adapted_model_and_what_adapting_cost(tmp_path, phantom_dir, phantom_subject):
    from bundle.evaluate import evaluate
    from bundle.io import write_nifti
    from bundle.stack import SaxStack
    from bundle.weights import export_model, save_weights

    model = tiny_model_over_flow()
    info = model.info
    save_weights(model.network.autoencoder, tmp_path / "autoencoder.pt", info.updated(stage="autoencoder"))
    save_weights(model.network.denoiser, tmp_path / "diffusion.pt", info.updated(stage="diffusion"))
    weights = export_model(tmp_path / "autoencoder.pt", tmp_path / "diffusion.pt", tmp_path / "model", half=False)
    s = phantom_subject
    folder = tmp_path / "stacks"
    write_nifti(SaxStack(s.sparse.array[..., :2], s.sparse.affine, {"was_3d": True}), folder / "P1.nii.gz")
    labels = SaxStack((s.labels.array[:, :, ::8, :2] == 1).astype(np.uint8), s.sparse.affine, {"was_3d": True})
    write_nifti(labels, folder / "P1_labels.nii.gz", dtype=np.uint8)
    with pytest.raises(InputRefused, match="adapt needs weights"):
        evaluate(tmp_path / "none", phantom=phantom_dir, adapt=2, perceptual=False, reference=False)
    assert not (tmp_path / "none").exists()  # refused before anything is written
    report = evaluate(
        tmp_path / "ev", phantom=phantom_dir, labelled_stacks=folder, weights=weights, adapt=2,
        sweep_steps=[], perceptual=False, reference=False,
    )  # fmt: skip
    loo = report["labelled_stacks"]["P1"]["calid adapted"]
    assert [run["steps"] for run in loo["adaptation"]] == [2, 2]  # one model per parity
    assert "calid adapted-phases" in report["labelled_stacks"]["P1"]  # fused over phases as calid is
    for methods in report["phantom"].values():
        assert methods["calid adapted"]["adaptation"]["steps"] == 2
    text = (tmp_path / "ev" / "report.md").read_text()
    assert "## Adaptation to each input" in text and "| P1 | calid adapted | 2 |" in text
