"""The learned model over flow: formulation, gap embedding, warm start, triplets, training config."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT

from bundle.errors import InputRefused
from bundle.inference import LearnedMidpoints
from bundle.metrics import ssim
from bundle.motion import FlowMidpoints, flow_conditioning
from bundle.networks import FLOW_CORRECTION_FEATURES, CaLIDNetwork, FlowCorrection, preset
from bundle.upsample import upsample_stack
from bundle.weights import (
    CaLIDModel,
    ModelInfo,
    attach_flow_correction,
    export_model,
    export_run,
    extract_autoencoder,
    load_model,
    save_weights,
    warm_start_over_flow,
)


def over_flow_info(**changes):
    net = dict(preset("tiny"), conditioning_channels=4, gap_classes=64)
    return ModelInfo("model", 2, net, preset="tiny", latent_scale=1.3, base="flow", **changes)


def test_an_untrained_model_over_flow_returns_the_flow_midpoint_through_the_pipeline(phantom_subject):
    """The denoiser's output starts at zero: the residual over flow is zero, the slice is the
    flow midpoint exactly (up to float rounding), at every level of a x4 bisection."""
    torch.manual_seed(0)
    info = over_flow_info()
    model = CaLIDModel(CaLIDNetwork.from_info(info).eval(), info, "untrained")
    stack = phantom_subject.sparse
    learned = upsample_stack(stack, 4, LearnedMidpoints(model, model.preprocessor(stack), num_steps=2, fallback=False))
    flow = upsample_stack(stack, 4, FlowMidpoints())
    np.testing.assert_allclose(learned.array, flow.array, rtol=0, atol=1e-3 * np.abs(flow.array).max())


def test_the_gap_is_embedded_like_the_timestep():
    torch.manual_seed(0)
    network = CaLIDNetwork.from_info(over_flow_info())
    denoiser = network.denoiser
    assert denoiser.gap_class(16.4, 3, "cpu").tolist() == [16, 16, 16]
    assert denoiser.gap_class(torch.tensor([2.0, 99.0]), 2, "cpu").tolist() == [2, 63]  # clamped to the table
    for embedding in (denoiser.unet.class_embedding, denoiser.control.class_embedding):
        assert torch.count_nonzero(embedding.weight) == 0  # an untrained model ignores the gap
        torch.nn.init.normal_(embedding.weight)
    with torch.no_grad():  # the zero-initialised convolutions (the U-Net's output, each block's last) perturbed
        for p in denoiser.parameters():
            if p.dim() > 1 and torch.count_nonzero(p) == 0:
                p.normal_(std=0.1)
    z, cond = torch.randn(1, 2, 8, 8), torch.rand(1, 4, 32, 32)
    t = torch.tensor([10])
    assert not torch.allclose(denoiser(z, t, cond, gap_mm=4.0), denoiser(z, t, cond, gap_mm=16.0))
    with pytest.raises(ValueError, match="conditioning must be"):
        denoiser(z, t, cond[:, :2], gap_mm=4.0)


def test_model_info_refuses_an_inconsistent_model_over_flow():
    net = dict(preset("tiny"), conditioning_channels=4)
    with pytest.raises(InputRefused, match="needs prediction residual"):
        ModelInfo.from_dict({"spatial_dims": 2, "net": net, "base": "flow", "prediction": "epsilon"})
    with pytest.raises(InputRefused, match="conditions on 4 channels, net says 2"):
        ModelInfo.from_dict({"spatial_dims": 2, "net": preset("tiny"), "base": "flow"})
    with pytest.raises(InputRefused, match="base must be one of"):
        ModelInfo.from_dict({"spatial_dims": 2, "net": net, "base": "tvl1"})


def test_warm_start_over_flow_keeps_what_fits_and_starts_at_the_flow_midpoint(tmp_path):
    from conftest import write_tiny_weights

    old = load_model(write_tiny_weights(tmp_path / "old", prediction="residual"))
    network = CaLIDNetwork.from_info(over_flow_info())
    warm_start_over_flow(network.denoiser, tmp_path / "old" / "model.pt")
    old_state, new_state = old.network.denoiser.state_dict(), network.denoiser.state_dict()
    key = "control.controlnet_cond_embedding.conv_in.conv.weight"
    assert torch.equal(new_state[key][:, :2], old_state[key]) and not new_state[key][:, 2:].any()
    key = "unet.down_blocks.0.resnets.0.conv1.conv.weight"
    assert torch.equal(new_state[key], old_state[key])
    assert not any(v.any() for k, v in new_state.items() if k.startswith("unet.out.") and "conv" in k)
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    cond = flow_conditioning(a, b)
    out = network.eval()(cond, num_steps=1, base=cond[:, 2:3], gap_mm=8.0, z_start=torch.randn(2, 2, 8, 8))
    torch.testing.assert_close(out, cond[:, 2:3], rtol=0, atol=1e-5)


def test_a_model_over_flow_exports_loads_and_falls_back_like_any_other(tmp_path, phantom_subject):
    torch.manual_seed(0)
    info = over_flow_info()
    network = CaLIDNetwork.from_info(info)
    for p in network.denoiser.unet.out.parameters():
        torch.nn.init.normal_(p, std=0.05)  # a correction that is not zero
    save_weights(network.autoencoder, tmp_path / "autoencoder.pt", info.updated(stage="autoencoder"))
    save_weights(network.denoiser, tmp_path / "diffusion.pt", info.updated(stage="diffusion"))
    folder = export_model(tmp_path / "autoencoder.pt", tmp_path / "diffusion.pt", tmp_path / "model", half=False)
    model = load_model(folder)
    assert model.info.base == "flow" and model.info.net["conditioning_channels"] == 4
    stack = phantom_subject.sparse
    learned = upsample_stack(stack, 2, LearnedMidpoints(model, model.preprocessor(stack), num_steps=1))
    flow = upsample_stack(stack, 2, FlowMidpoints())
    assert not np.allclose(learned.array, flow.array, atol=1e-3)
    np.testing.assert_array_equal(learned.array[:, :, ::2], stack.array)
    # the next run trains on this model's frozen VAE (configs/train_diffusion_flow.json): its
    # extracted record must export again
    vae = extract_autoencoder(folder, tmp_path / "next" / "autoencoder.pt")
    again = load_model(export_model(vae, tmp_path / "diffusion.pt", tmp_path / "model2", half=False))
    assert again.info.base == "flow" and again.info.trained_on == model.info.trained_on


def test_triplets_at_every_gap_from_each_source(tmp_path, phantom_subject):
    from bundle.flow_triplets import FlowTriplets, collect, phantom_triplets, stack_triplets

    slices = np.random.default_rng(0).random((7, 3, 32, 32)).astype(np.float32)
    part = stack_triplets(slices, 8.0, "s", gaps=(1, 2))
    assert len(part.gap_mm) == (5 + 3) * 3 and sorted(set(part.gap_mm.tolist())) == [16.0, 32.0]
    torch.testing.assert_close(part.middle[0, 0], torch.from_numpy(slices[1, 0]))
    torch.testing.assert_close(part.left[-1, 0], torch.from_numpy(slices[2, 2]))  # gap 2, n = 4, last phase
    small = phantom_triplets(1, half_gaps=(1, 4), phases=2, size=48)
    assert sorted(set(small.gap_mm.tolist())) == [2.0, 8.0]
    data = collect([part, small])  # different slice sizes: fitted to the first's
    assert data["neighbours"].shape[1:] == (4, 32, 32) and len(data["gap_mm"]) == len(part.gap_mm) + len(small.gap_mm)
    fixed = FlowTriplets(data, size=(16, 16), augment=False)[0]
    torch.testing.assert_close(fixed["base"], fixed["neighbours"][2:3])
    assert fixed["image"].shape == (1, 16, 16) and fixed["gap_mm"] == 16.0
    swapped = FlowTriplets({k: v[:1] for k, v in data.items()}, size=(32, 32), augment=True, seed=3)
    for _ in range(8):  # whatever the augmentation, the midpoint channel is the base
        item = swapped[0]
        torch.testing.assert_close(item["base"], item["neighbours"][2:3])


def run_flow_training(tmp_path, **overrides):
    """configs/train_diffusion_flow.json on a tiny preset and phantoms, one epoch, into tmp_path/run."""
    from monai.bundle import ConfigWorkflow

    residual = write_residual_tiny_weights(tmp_path / "warm")
    configs = [str(ROOT / "configs" / name) for name in ("train_autoencoder.json", "train_diffusion.json")]
    configs.append(str(ROOT / "configs" / "train_diffusion_flow.json"))
    wf = ConfigWorkflow(
        config_file=configs,
        meta_file=str(ROOT / "configs" / "metadata.json"),
        workflow_type="train",
        bundle_root=str(ROOT),
        preset="tiny",
        device="cpu",
        output_dir=str(tmp_path / "run"),
        vae_from=str(residual),
        init_weights=str(residual / "model.pt"),
        train_studies=[],
        train_labelled=[],
        val_labelled=[],
        phantom_seeds=[5],
        phantom_size=48,
        val_parts="$[bundle.flow_triplets.phantom_triplets(6, half_gaps=(2,), phases=2, size=48)]",
        max_epochs=1,
        batch_size=8,
        **overrides,
    )
    wf.initialize()
    wf.run()
    return tmp_path / "run"


def test_the_flow_training_config_trains_validates_and_exports(tmp_path):
    """One epoch, validation against flow, export of a model over flow that loads."""
    run = run_flow_training(tmp_path)
    rows = (run / "validation.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,iteration,val_psnr") and "val_psnr_baseline" in rows[0] and len(rows) == 3
    model = load_model(run / "model")
    assert model.info.base == "flow" and model.info.trained_gaps_mm == [2.0, 8.0] and model.info.steps == 1
    assert model.info.net["latent_inputs"]  # the config's default since 0.6.0
    assert model.network.flow_correction is None and not (run / "flow_correction.pt").exists()
    assert json.loads((run / "model" / "model.json").read_text())["trained_on"] == ["phantom 5"]


def test_the_flow_training_config_trains_over_a_flow_correction_head_and_exports_it(tmp_path):
    """With ``flow_correction`` (here a model folder's model.pt holding a head) the run keeps a
    copy of the head, conditions on its output, and exports the denoiser with it: the model that
    loads applies the same head. Exporting that denoiser without its head is refused."""
    head = moved_head()
    torch.save({f"flow_correction.{k}": v.half() for k, v in head.state_dict().items()}, tmp_path / "holder.pt")
    run = run_flow_training(tmp_path, flow_correction=str(tmp_path / "holder.pt"))
    kept = torch.load(run / "flow_correction.pt", weights_only=True)
    for key, value in head.state_dict().items():
        torch.testing.assert_close(kept[key], value.half().float())
    model = load_model(run / "model")
    assert model.info.net["flow_correction"] == FLOW_CORRECTION_FEATURES
    for key, value in kept.items():
        torch.testing.assert_close(model.network.flow_correction.state_dict()[key], value.half().float())
    with pytest.raises(InputRefused, match="trained over a flow-correction head: export it with that head"):
        export_model(run / "autoencoder" / "autoencoder.pt", run / "diffusion.pt", tmp_path / "headless")
    assert not (tmp_path / "headless").exists()
    again = load_model(export_run(run, tmp_path / "again", run / "diffusion.pt"))  # the scripts' export finds the head
    assert again.info.net["flow_correction"] == FLOW_CORRECTION_FEATURES


def test_a_bad_flow_correction_head_is_refused_before_anything_is_read_or_written(tmp_path):
    """The head is checked with the time box, before the output folder and before any data."""
    import os
    import subprocess
    import sys

    (tmp_path / "bad.pt").write_text("not weights")
    out = tmp_path / "run"
    configs = [
        str(ROOT / "configs" / n)
        for n in ("train_autoencoder.json", "train_diffusion.json", "train_diffusion_flow.json")
    ]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr(configs),
        "--meta_file", str(ROOT / "configs" / "metadata.json"), "--bundle_root", str(ROOT), "--preset", "tiny",
        "--device", "cpu", "--output_dir", str(out), "--flow_correction", str(tmp_path / "bad.pt"),
        "--cine_dir", str(tmp_path / "no_studies"),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"calid: error: {tmp_path / 'bad.pt'} holds no flow-correction head ("), last
    assert not out.exists()


def test_triplets_condition_on_the_heads_output_when_given_one():
    """The training data over a head is what inference gives the denoiser: the head's output
    on whole slices, its corrected midpoint the base."""
    from bundle.flow_triplets import FlowTriplets, collect, stack_triplets

    slices = np.random.default_rng(1).random((5, 2, 32, 32)).astype(np.float32)
    part = stack_triplets(slices, 8.0, "s", gaps=(1,))
    head = moved_head()
    data = collect([part], correction=head)
    with torch.no_grad():
        want = head(flow_conditioning(part.left, part.right), part.gap_mm)
    torch.testing.assert_close(data["neighbours"].float(), want.half().float())
    plain = collect([part])["neighbours"].float()
    assert (data["neighbours"][:, 2].float() - plain[:, 2]).abs().max() > 1e-2  # the head moved the midpoint
    item = FlowTriplets(data, size=(32, 32), augment=False)[0]
    torch.testing.assert_close(item["base"], want[0, 2:3].half().float())


def moved_head():
    """A flow-correction head whose output differs from the flow midpoint: every pixel of the
    left neighbour moved by one pixel, the right by minus one, the midpoint's weight lowered."""
    head = FlowCorrection()
    with torch.no_grad():
        head.unet.final_conv.bias.copy_(torch.tensor([0.0, 1.0, 0, -1.0, 0, 0, 0]))
    return head.eval()


def write_residual_tiny_weights(folder):
    from conftest import write_tiny_weights

    return write_tiny_weights(folder, prediction="residual")


def test_a_model_that_starts_from_the_mean_is_deterministic(phantom_subject):
    """start "mean": DDIM from the prior's mean (zero), the model's mean estimate; seeds do not matter."""
    torch.manual_seed(0)
    info = over_flow_info(start="mean")
    network = CaLIDNetwork.from_info(info).eval()
    for p in network.denoiser.unet.out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model = CaLIDModel(network, info, "test")
    stack = phantom_subject.sparse
    runs = [
        upsample_stack(stack, 2, LearnedMidpoints(model, model.preprocessor(stack), num_steps=1, seed=s)).array
        for s in (0, 1)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    with pytest.raises(InputRefused, match="start must be one of"):
        ModelInfo.from_dict({**over_flow_info().to_dict(), "start": "median"})


def over_flow_trainer(network, latent_scale=1.0, **kwargs):
    from bundle.engines import LatentDiffusionTrainer, LatentScale
    from bundle.sampling import make_noise_scheduler

    return LatentDiffusionTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[],
        network=network.denoiser,
        optimizer=torch.optim.Adam(network.denoiser.parameters(), 1e-4),
        autoencoder=network.autoencoder,
        noise_scheduler=make_noise_scheduler(),
        latent_scale=LatentScale(latent_scale),
        **kwargs,
    )


def test_mean_fraction_trains_the_deterministic_start():
    """The first mean_fraction of each batch is trained where a "mean"-start sample begins:
    the latent zero at the last timestep; the rest is noised at random timesteps."""
    torch.manual_seed(0)
    network = CaLIDNetwork.from_info(over_flow_info())
    seen = {}

    def recording_inferer(z_t, net, timesteps, conditioning, **extra):
        seen.update(z_t=z_t.clone(), timesteps=timesteps.clone(), gap_mm=extra.get("gap_mm"))
        return net(z_t, timesteps, conditioning, **extra)

    trainer = over_flow_trainer(network, inferer=recording_inferer, mean_fraction=0.5)
    a, b = torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32)
    cond = flow_conditioning(a, b)
    batch = {"image": a, "neighbours": cond, "base": cond[:, 2:3], "gap_mm": torch.full((4,), 16.0)}
    trainer._iteration(trainer, batch)
    assert seen["timesteps"][:2].tolist() == [999, 999] and not seen["z_t"][:2].any()
    assert seen["z_t"][2:].abs().sum() > 0 and seen["gap_mm"].tolist() == [16.0] * 4


def test_the_image_loss_scores_the_slice_the_one_step_sample_returns():
    """image_loss_weight: the L1 the trainer adds is that of the slice a one-step sample from
    the mean start returns (base + D(z(base) + r) - D(z(base))), and its gradient reaches the
    denoiser through the frozen decoder; image_ssim_weight adds 1 - SSIM of that slice."""
    torch.manual_seed(0)
    info = over_flow_info(start="mean")
    network = CaLIDNetwork.from_info(info)
    for p in network.denoiser.unet.out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    trainer = over_flow_trainer(network, info.latent_scale, mean_fraction=0.5, image_loss_weight=1.0)
    a, b, truth = torch.rand(3, 2, 1, 32, 32)
    cond, gap = flow_conditioning(a, b), torch.full((2,), 16.0)
    base = cond[:, 2:3]
    z_base = network.autoencoder.encode(base)[0]
    zero = torch.zeros(2, 2, 8, 8)
    correction = network.denoiser(zero, torch.full((2,), 999), cond, gap_mm=gap)
    corrected = trainer._corrected(correction, z_base, base)
    loss = trainer._image_loss(corrected, truth)
    with torch.no_grad():
        sample = network.eval()(cond, num_steps=1, base=base, gap_mm=gap, z_start=zero)
    torch.testing.assert_close(corrected, sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, torch.nn.functional.l1_loss(sample, truth), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert network.denoiser.unet.out[-1].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in network.autoencoder.parameters())
    out = trainer._iteration(trainer, {"image": truth, "neighbours": cond, "base": base, "gap_mm": gap})
    assert out["image_loss"] > 0 and out["loss"] == pytest.approx(out["latent_loss"] + out["image_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="image_loss_weight needs"):
        over_flow_trainer(network, mean_fraction=0.0, image_loss_weight=1.0)
    with_ssim = over_flow_trainer(
        network, info.latent_scale, mean_fraction=0.5, image_loss_weight=1.0, image_ssim_weight=0.5
    )
    with torch.no_grad():
        expected = torch.nn.functional.l1_loss(sample, truth) + 0.5 * (1 - ssim(sample, truth).mean())
        torch.testing.assert_close(with_ssim._image_loss(sample, truth), expected, rtol=1e-4, atol=1e-5)
    # image_loss_px: only the central square counts (the heart of an LV-centred item)
    heart = over_flow_trainer(network, info.latent_scale, mean_fraction=0.5, image_loss_weight=1.0, image_loss_px=16)
    elsewhere = truth.clone()
    elsewhere[..., :8, :] += 1.0
    elsewhere[..., 24:, :] -= 1.0
    with torch.no_grad():
        centre = torch.nn.functional.l1_loss(sample[..., 8:24, 8:24], truth[..., 8:24, 8:24])
        torch.testing.assert_close(heart._image_loss(sample, truth), centre)
        torch.testing.assert_close(heart._image_loss(sample, elsewhere), centre)
        assert loss < trainer._image_loss(sample, elsewhere)  # the whole-item loss sees it


def test_warm_start_over_flow_continues_weights_already_over_flow(tmp_path):
    """A denoiser trained over flow is loaded as it is (its correction and latent scale kept);
    one trained over linear keeps only its latent units' shape: its latent scale is not reused."""
    from bundle.weights import warm_start_latent_scale

    torch.manual_seed(0)
    info = over_flow_info()
    trained = CaLIDNetwork.from_info(info)
    for p in trained.denoiser.unet.out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_weights(trained.denoiser, tmp_path / "best.pt", info.updated(stage="diffusion"))
    network = CaLIDNetwork.from_info(info)
    warm_start_over_flow(network.denoiser, tmp_path / "best.pt")
    for key, value in trained.denoiser.state_dict().items():
        assert torch.equal(network.denoiser.state_dict()[key], value), key
    assert warm_start_latent_scale(tmp_path / "best.pt", base="flow") == 1.3
    over_linear = write_residual_tiny_weights(tmp_path / "linear") / "model.pt"
    assert warm_start_latent_scale(over_linear, base="flow") is None
    assert warm_start_latent_scale(over_linear) == ModelInfo.beside(over_linear).latent_scale


def test_latent_inputs_warm_start_from_weights_over_flow_returns_what_they_did(tmp_path):
    """latent_inputs: the U-Net and tau2 also see the latents of the two warped neighbours and of
    the flow midpoint. Warm-started from a denoiser over flow without them, the new input filters
    start at zero and the trained correction is kept: the same slices, to float rounding."""
    torch.manual_seed(0)
    info = over_flow_info(start="mean")
    trained = CaLIDNetwork.from_info(info).eval()
    for p in trained.denoiser.unet.out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_weights(trained.denoiser, tmp_path / "best.pt", info.updated(stage="diffusion"))
    wider = CaLIDNetwork.from_info(info.updated(net={**info.net, "latent_inputs": True})).eval()
    wider.autoencoder.load_state_dict(trained.autoencoder.state_dict())
    warm_start_over_flow(wider.denoiser, tmp_path / "best.pt")
    for conv_in in (wider.denoiser.unet.conv_in.conv.weight, wider.denoiser.control.conv_in.conv.weight):
        assert conv_in.shape[1] == 8 and conv_in[:, :2].any() and not conv_in[:, 2:].any()
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    cond, zero = flow_conditioning(a, b), torch.zeros(2, 2, 8, 8)
    before = trained(cond, num_steps=1, base=cond[:, 2:3], gap_mm=16.0, z_start=zero)
    after = wider(cond, num_steps=1, base=cond[:, 2:3], gap_mm=16.0, z_start=zero)
    assert not torch.allclose(before, cond[:, 2:3], atol=1e-3)  # a correction that is not zero, kept
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="takes the conditioning's latents"):
        wider.denoiser(zero, torch.tensor([999, 999]), cond, gap_mm=16.0)


def test_the_trainer_gives_latent_inputs_in_the_samplers_units():
    """What the trainer feeds a denoiser with latent_inputs is what SliceSampler feeds it: the
    latents of the two warped neighbours and of the midpoint, times the latent scale."""
    from bundle.sampling import conditioning_latents

    torch.manual_seed(0)
    info = over_flow_info()
    network = CaLIDNetwork.from_info(info.updated(net={**info.net, "latent_inputs": True}))
    seen = {}

    def recording_inferer(z_t, net, timesteps, conditioning, **extra):
        seen.update(extra)
        return net(z_t, timesteps, conditioning, **extra)

    trainer = over_flow_trainer(network, 1.3, inferer=recording_inferer, mean_fraction=0.5)
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    cond = flow_conditioning(a, b)
    trainer._iteration(trainer, {"image": a, "neighbours": cond, "base": cond[:, 2:3], "gap_mm": torch.full((2,), 8.0)})
    sampler = network.sampler(1)
    expected = conditioning_latents(sampler.encode, cond, sampler.encode(cond[:, 2:3]))
    assert seen["latents"].shape == (2, 6, 8, 8)
    torch.testing.assert_close(seen["latents"], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputRefused, match="latent_inputs needs prediction residual"):
        ModelInfo.from_dict(
            {"spatial_dims": 2, "net": {**preset("tiny"), "latent_inputs": True}, "prediction": "epsilon"}
        )


def test_the_flow_correction_head_starts_at_flow_and_moves_pixels():
    """An untrained head returns (about) the flow midpoint and the conditioning's own weight;
    its first two outputs displace the left neighbour, its blend logits choose among the
    re-warped neighbours and the midpoint (channel order as the docstring says)."""
    torch.manual_seed(0)
    head = FlowCorrection()
    cond = torch.rand(2, 4, 32, 32)
    out = head(cond, 16.0)
    assert out.shape == cond.shape and torch.equal(out[:, 3], cond[:, 3])
    torch.testing.assert_close(out[:, 2], cond[:, 2], rtol=0, atol=5e-3)  # softmax (e^-6, e^-6, 1)
    with torch.no_grad():  # left neighbour read 2 pixels on along the second axis, and chosen alone
        head.unet.final_conv.bias.copy_(torch.tensor([0.0, 2.0, 0, 0, 30.0, 0, 0]))
    out = head(cond, torch.tensor([8.0, 30.0]))
    torch.testing.assert_close(out[:, 2, :, :28], cond[:, 0, :, 2:30], rtol=0, atol=1e-4)
    torch.testing.assert_close(out[:, 2], out[:, 0], rtol=0, atol=1e-6)


def test_a_flow_correction_head_is_attached_loaded_and_used(tmp_path, phantom_subject):
    torch.manual_seed(0)
    info = over_flow_info()
    network = CaLIDNetwork.from_info(info)  # untrained denoiser: returns its base exactly
    save_weights(network.autoencoder, tmp_path / "autoencoder.pt", info.updated(stage="autoencoder"))
    save_weights(network.denoiser, tmp_path / "diffusion.pt", info.updated(stage="diffusion"))
    plain = export_model(tmp_path / "autoencoder.pt", tmp_path / "diffusion.pt", tmp_path / "plain", half=False)
    head = moved_head()
    torch.save(head.state_dict(), tmp_path / "head.pt")
    folder = attach_flow_correction(plain, tmp_path / "head.pt", tmp_path / "headed", record={"chosen_on": "x"})
    model = load_model(folder)
    assert model.info.net["flow_correction"] == FLOW_CORRECTION_FEATURES
    assert model.info.extra["flow_correction_record"] == {"chosen_on": "x"}
    assert ModelInfo.read(plain / "model.json").net.get("flow_correction") is None  # the source is untouched
    stack = phantom_subject.sparse
    learned = upsample_stack(stack, 2, LearnedMidpoints(model, model.preprocessor(stack), num_steps=1, fallback=False))
    # the untrained denoiser returns its base: the head's corrected midpoint, computed here by hand
    a = torch.from_numpy(stack.array[:, :, 0:1, 0].transpose(2, 0, 1)[:, None]).float()
    b = torch.from_numpy(stack.array[:, :, 1:2, 0].transpose(2, 0, 1)[:, None]).float()
    pre = model.preprocessor(stack)
    gap_mm = stack.slice_spacing
    want = head(flow_conditioning(pre.forward(a), pre.forward(b)), gap_mm)[:, 2:3]
    want = pre.inverse(want)[0, 0].detach().numpy()
    np.testing.assert_allclose(learned.array[:, :, 1, 0], want, rtol=0, atol=1e-3 * np.abs(want).max())
    flow = upsample_stack(stack, 2, FlowMidpoints())
    assert not np.allclose(learned.array[:, :, 1, 0], flow.array[:, :, 1, 0], atol=1e-3)
    with pytest.raises(InputRefused, match="already holds model.pt"):
        attach_flow_correction(plain, tmp_path / "head.pt", folder)
    torch.save({"unet.conv_0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(InputRefused, match="holds no flow-correction head"):
        attach_flow_correction(plain, tmp_path / "bad.pt", tmp_path / "bad")


def test_model_info_refuses_a_flow_correction_head_it_cannot_use():
    net = dict(preset("tiny"), flow_correction=FLOW_CORRECTION_FEATURES)
    with pytest.raises(InputRefused, match="needs base flow"):
        ModelInfo.from_dict({"spatial_dims": 2, "net": net})
    net = dict(net, conditioning_channels=4, flow_correction=[16, 32])
    with pytest.raises(InputRefused, match="six positive widths"):
        ModelInfo.from_dict({"spatial_dims": 2, "net": net, "base": "flow", "prediction": "residual"})
