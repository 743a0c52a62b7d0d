"""Both training stages through the real config files and monai.bundle, tiny preset, CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

AE = str(ROOT / "configs" / "train_autoencoder.json")
LDM = str(ROOT / "configs" / "train_diffusion.json")
META = str(ROOT / "configs" / "metadata.json")


def workflow(config_files, **override):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=config_files, meta_file=META, workflow_type=None, preset="tiny", bundle_root=str(ROOT), **override
    )
    wf.initialize()
    return wf


def diffusion_workflow(phantom_dir, autoencoder_dir, output_dir, **override):
    """The diffusion stage on the phantom folder, from a trained autoencoder."""
    return workflow(
        [AE, LDM],
        dataset_dir=str(phantom_dir),
        output_dir=str(output_dir),
        autoencoder_dir=str(autoencoder_dir),
        **override,
    )


@pytest.fixture(scope="module")
def trained_autoencoder(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ae")
    wf = workflow([AE], dataset_dir=str(phantom_dir), output_dir=str(out), max_epochs=1)
    wf.run()
    wf.finalize()
    return out


def test_autoencoder_stage_one_epoch(trained_autoencoder):
    out = trained_autoencoder
    assert (out / "autoencoder.pt").is_file() and (out / "autoencoder.json").is_file()
    assert list((out / "checkpoints").glob("checkpoint_*.pt"))
    state = torch.load(out / "autoencoder.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in state)
    assert (out / "validation.csv").read_text().startswith("epoch,iteration,val_psnr")


def test_diffusion_stage_one_epoch(phantom_dir, trained_autoencoder, tmp_path):
    wf = diffusion_workflow(phantom_dir, trained_autoencoder, tmp_path, max_epochs=1)
    wf.run()
    wf.finalize()
    import json

    info = json.loads((tmp_path / "diffusion.json").read_text())
    assert info["stage"] == "diffusion" and info["preset"] == "tiny" and info["latent_scale"] > 0
    state = torch.load(tmp_path / "diffusion.pt", weights_only=True)
    assert any(k.startswith("control.controlnet_cond_embedding") for k in state)
    assert (tmp_path / "best.pt").is_file()


def test_diffusion_needs_a_trained_autoencoder(phantom_dir, tmp_path):
    wf = workflow(
        [AE, LDM], dataset_dir=str(phantom_dir), output_dir=str(tmp_path), autoencoder_dir=str(tmp_path / "none")
    )
    with pytest.raises(RuntimeError) as info:  # monai.bundle wraps the cause
        wf.run()
    assert "no trained weights at" in str(info.value.__cause__)


def overfit_losses(wf, iterations=40):
    """Run the trainer's own iteration on one fixed batch; returns the losses."""
    trainer = wf.parser.get_parsed_content("trainer")
    batch = next(iter(wf.parser.get_parsed_content("train_loader")))
    losses = []
    for _ in range(iterations):
        trainer.state.iteration += 1
        losses.append(trainer._iteration(trainer, batch)["loss"])
    return losses


def test_autoencoder_overfits_a_fixed_batch(phantom_dir, tmp_path):
    wf = workflow([AE], dataset_dir=str(phantom_dir), output_dir=str(tmp_path), lr=3e-3, warmup_iterations=1)
    losses = overfit_losses(wf)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_diffusion_overfits_a_fixed_batch(phantom_dir, trained_autoencoder, tmp_path):
    wf = diffusion_workflow(phantom_dir, trained_autoencoder, tmp_path, lr=3e-3, warmup_iterations=1)
    losses = overfit_losses(wf, iterations=60)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses


def test_kill_and_resume(phantom_dir, tmp_path):
    """SIGKILL a real training process after a checkpoint; a restart resumes from it with the
    same model, optimiser and iteration counter, and carries on counting."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", AE, "--meta_file", META, "--bundle_root", str(ROOT),
        "--preset", "tiny", "--dataset_dir", str(phantom_dir), "--output_dir", str(out),
        "--max_epochs", "1000", "--checkpoint_every", "3",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while not list((out / "checkpoints").glob("checkpoint_6.pt")) and time.time() < deadline:
            assert proc.poll() is None, "training exited early"
            time.sleep(0.2)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    from bundle.handlers import latest_checkpoint, resume_latest

    path = latest_checkpoint(out / "checkpoints")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    n = saved["trainer"]["iteration"]
    assert n >= 6 and n % 3 == 0

    wf = workflow([AE], dataset_dir=str(phantom_dir), output_dir=str(out), max_epochs=1000)
    objects = wf.parser.get_parsed_content("checkpoint_objects")
    assert resume_latest(out / "checkpoints", objects, max_epochs=1200) == path
    trainer = objects["trainer"]
    assert trainer.state.iteration == n and trainer.state.max_epochs == 1200  # the run's setting wins
    for key, value in saved["network"].items():
        torch.testing.assert_close(objects["network"].state_dict()[key], value, rtol=0, atol=0)
    opt_state = objects["optimizer"].state_dict()
    for idx, param_state in saved["optimizer"]["state"].items():
        torch.testing.assert_close(opt_state["state"][idx]["exp_avg"], param_state["exp_avg"], rtol=0, atol=0)
    for key, value in saved["ema"].items():
        torch.testing.assert_close(objects["ema"].state_dict()[key], value, rtol=0, atol=0)

    # carry on for a few iterations: the counter continues from n
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=n + 2), lambda engine: engine.terminate())
    trainer.run()
    assert trainer.state.iteration == n + 2


def test_a_time_box_stops_the_run_cleanly_and_the_next_run_resumes(phantom_dir, tmp_path):
    """--max_minutes: the run ends after the iteration that passes the box (here the first),
    saves its checkpoint and weights as a finished run does; the next run carries on from it."""
    from bundle.handlers import latest_checkpoint

    out = tmp_path / "run"
    for expected in (1, 2):  # a box of 60 microseconds: one iteration per run
        wf = workflow([AE], dataset_dir=str(phantom_dir), output_dir=str(out), max_epochs=3, max_minutes="1e-6")
        wf.run()
        wf.finalize()
        assert latest_checkpoint(out / "checkpoints").name == f"checkpoint_{expected}.pt"
        assert (out / "autoencoder.pt").is_file()


def test_the_time_box_reads_overrides_and_refuses_nonsense():
    from bundle.errors import InputRefused
    from bundle.handlers import TimeBox

    assert TimeBox(None).seconds is None and TimeBox("None").seconds is None and TimeBox("null").seconds is None
    assert TimeBox("1.5").seconds == 90.0 and TimeBox(40).seconds == 2400.0
    for bad in ("soon", 0, -3, True, "nan"):
        with pytest.raises(InputRefused, match="max_minutes must be a positive number"):
            TimeBox(bad)


def test_a_bad_time_box_is_refused_in_one_line_before_anything_is_written(phantom_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", AE, "--meta_file", META, "--bundle_root", str(ROOT),
        "--preset", "tiny", "--dataset_dir", str(phantom_dir), "--output_dir", str(out), "--max_minutes", "soon",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (
        "calid: error: max_minutes must be a positive number of minutes (or None: no limit), got 'soon'"
    )
    assert not out.exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("max_minutes", [None, "1e-6"])
def test_torchrun_two_processes_gloo(phantom_dir, tmp_path, max_minutes):
    """Both ranks train in step; with a time box, rank 0's clock stops both at the same iteration."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
        str(ROOT / "tests" / "ddp_worker.py"), str(phantom_dir), str(out), *([max_minutes] if max_minutes else []),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(out / "rank0.pt", weights_only=True)
    b = torch.load(out / "rank1.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] > 0
    if max_minutes:  # the box ends the run after the first iteration, on both ranks
        assert a["iteration"] == 1
    for key in a["network"]:
        torch.testing.assert_close(a["network"][key], b["network"][key], rtol=0, atol=0)
    assert (out / "autoencoder.pt").is_file()


def test_same_seed_same_weights_on_cpu(phantom_dir, trained_autoencoder, tmp_path):
    wf = workflow([AE], dataset_dir=str(phantom_dir), output_dir=str(tmp_path), max_epochs=1)
    wf.run()
    wf.finalize()
    a = torch.load(trained_autoencoder / "autoencoder.pt", weights_only=True)
    b = torch.load(tmp_path / "autoencoder.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_two_d_plus_t_variant_by_config(phantom_dir, tmp_path):
    ae_out, ldm_out = tmp_path / "ae", tmp_path / "ldm"
    wf = workflow([AE], dataset_dir=str(phantom_dir), output_dir=str(ae_out), max_epochs=1, temporal=True)
    wf.run()
    assert wf.parser.get_parsed_content("spatial_dims") == 3
    batch = next(iter(wf.parser.get_parsed_content("train_loader")))
    assert batch["image"].shape == (4, 1, 32, 32, 8)  # tiny: 32 x 32 pixels, 8 frames (3 phases, wrapped)
    wf = diffusion_workflow(phantom_dir, ae_out, ldm_out, max_epochs=1, temporal=True)
    wf.run()
    assert (ldm_out / "diffusion.pt").is_file()


def test_perceptual_term_loads_local_alexnet_weights_and_falls_back(tmp_path, caplog, monkeypatch):
    """The real LPIPS loading code, fed a local AlexNet state dict (random values here: none
    can be downloaded), and the offline fallback, which says so in the log."""
    import torchvision

    from bundle.losses import PerceptualTerm

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty hub cache
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), weights)
    lpips_term = PerceptualTerm(weights_path=weights)
    assert lpips_term.kind == "lpips"
    backbone = torch.load(weights, weights_only=True)
    torch.testing.assert_close(lpips_term.lpips.net.slice1[0].weight, backbone["features.0.weight"])
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    assert lpips_term(a, a).item() == pytest.approx(0.0, abs=1e-6) and lpips_term(a, b).item() > 0
    with caplog.at_level("WARNING"):
        fallback = PerceptualTerm(weights_path=tmp_path / "missing.pth")
    assert fallback.kind == "ssim" and "using 1 - SSIM instead" in caplog.text
    assert fallback(a, a).item() == pytest.approx(0.0, abs=1e-5) and fallback(a, b).item() > 0.5
    assert PerceptualTerm(weights_path=tmp_path / "missing.pth", fallback="none")(a, b).item() == 0.0


def test_residual_diffusion_stage(phantom_dir, trained_autoencoder, tmp_path):
    import json

    wf = diffusion_workflow(
        phantom_dir, trained_autoencoder, tmp_path / "run", prediction="residual", lr=3e-3, warmup_iterations=1
    )
    losses = overfit_losses(wf, iterations=40)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses
    wf = diffusion_workflow(phantom_dir, trained_autoencoder, tmp_path / "full", prediction="residual", max_epochs=1)
    wf.run()
    info = json.loads((tmp_path / "full" / "diffusion.json").read_text())
    assert info["prediction"] == "residual"


def test_validation_without_validation_studies_is_skipped(tmp_path, caplog):
    from ignite.engine import Engine

    from bundle.handlers import InterpolationValidator

    validator = InterpolationValidator([], predictor=None, output_dir=tmp_path)
    engine = Engine(lambda e, b: None)
    with caplog.at_level("WARNING"):
        validator(engine)
    assert "validation skipped" in caplog.text and not (tmp_path / "validation.csv").exists()


def test_validation_can_score_the_central_square_only(tmp_path):
    """score_px: the gain is measured on the central square of each item (the LV, where the
    evaluation scores), not on the rest of the crop."""
    from bundle.handlers import InterpolationValidator

    torch.manual_seed(0)
    items = [
        {"image": torch.rand(1, 32, 32), "neighbours": torch.rand(4, 32, 32), "base": torch.rand(1, 32, 32)}
        for _ in range(3)
    ]

    def right_in_the_centre(batch):  # the truth in the central 16 x 16, the base, off by 0.5, around it
        pred = batch["base"] + 0.5
        pred[..., 8:24, 8:24] = batch["image"][..., 8:24, 8:24]
        return pred

    whole = InterpolationValidator(items, right_in_the_centre, tmp_path).evaluate()
    centre = InterpolationValidator(items, right_in_the_centre, tmp_path, score_px=16).evaluate()
    assert whole["val_gain_db"] < 0 < centre["val_gain_db"]
    assert centre["val_psnr"] == float("inf") or centre["val_psnr"] > 60


def test_the_noise_schedule_travels_with_the_weights(phantom_dir, trained_autoencoder, tmp_path):
    """A config that changes the schedule trains one model: validation, export and inference all
    sample with the schedule it was trained with."""
    import json

    from bundle.inference import LearnedMidpoints
    from bundle.sampling import make_noise_scheduler
    from bundle.transforms import SlicePreprocessor
    from bundle.weights import load_model

    wf = diffusion_workflow(
        phantom_dir,
        trained_autoencoder,
        tmp_path,
        max_epochs=1,
        **{"noise_schedule#beta_end": 0.02, "noise_schedule#num_train_timesteps": 500},
    )
    wf.run()
    trained = wf.parser.get_parsed_content("noise_scheduler").alphas_cumprod
    assert len(trained) == 500 and not torch.allclose(trained, make_noise_scheduler().alphas_cumprod[:500])
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["noise_schedule"]["beta_end"] == 0.02 and info["noise_schedule"]["num_train_timesteps"] == 500
    model = load_model(tmp_path / "model")
    torch.testing.assert_close(model.network.alphas_cumprod, trained)
    from bundle.phantom import make_subject

    stack = make_subject(seed=0, size=32, num_slices=3, num_phases=1).sparse  # only the schedule matters here
    pre = SlicePreprocessor.for_stack(stack, None, model.size_multiple)
    sampler = LearnedMidpoints(model, pre, num_steps=2).sampler
    torch.testing.assert_close(sampler.ddim.alphas_cumprod, trained.double())
    assert sampler.ddim.timesteps[0] == 499


def test_shipped_weights_record_their_schedule_and_sample_as_before():
    """models/model.json now records the schedule the shipped weights were trained with (the
    default); loading with and without that record gives the same sampler, hence the same output."""
    import json
    import shutil
    import tempfile

    from bundle.sampling import DEFAULT_NOISE_SCHEDULE, make_noise_scheduler
    from bundle.weights import load_model

    info = json.loads((ROOT / "models" / "model.json").read_text())
    assert info["noise_schedule"] == DEFAULT_NOISE_SCHEDULE
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(ROOT / "models" / "model.pt", folder)
        legacy = {k: v for k, v in info.items() if k != "noise_schedule"}
        (Path(folder) / "model.json").write_text(json.dumps(legacy))
        torch.testing.assert_close(
            load_model(folder).network.alphas_cumprod, load_model(ROOT / "models").network.alphas_cumprod
        )
    torch.testing.assert_close(
        load_model(ROOT / "models").network.alphas_cumprod, make_noise_scheduler().alphas_cumprod
    )


def test_model_info_owns_model_json(tmp_path):
    """The shipped models/model.json is what ModelInfo writes (nothing lost, nothing added);
    one set of defaults; bad records are refused naming the file."""
    from bundle.errors import InputRefused
    from bundle.sampling import DEFAULT_NOISE_SCHEDULE
    from bundle.weights import ModelInfo

    shipped = ROOT / "models" / "model.json"
    info = ModelInfo.read(shipped)
    assert info.write(tmp_path / "model.json").read_text() == shipped.read_text()
    assert info.extra == {
        k: v
        for k, v in json.loads(shipped.read_text()).items()
        if k in ("validation", "recipe", "flow_correction_record")
    }
    from bundle.networks import preset

    minimal = ModelInfo.from_dict({"spatial_dims": 2, "net": preset("cpu")})
    assert (minimal.stage, minimal.prediction, minimal.steps) == ("model", "residual", 8)
    assert minimal.noise_schedule == DEFAULT_NOISE_SCHEDULE and minimal.fallback_below_mm is None
    for bad, message in [
        ({"spatial_dims": 4, "net": {}}, "spatial_dims must be 2 or 3"),
        ({"spatial_dims": 2, "net": {}, "prediction": "velocity"}, "prediction must be one of"),
        ({"spatial_dims": 2, "net": {}, "steps": 0}, "steps must be a whole number"),
        ({"spatial_dims": 2, "net": {}, "noise_schedule": {"schedule": "nonsense"}}, "cannot be built"),
        ({"spatial_dims": 2, "net": {}, "fallback_below_mm": -1}, "fallback_below_mm must be a positive"),
        ({"net": {}}, "lacks spatial_dims"),
    ]:
        with pytest.raises(InputRefused, match=message):
            ModelInfo.from_dict(bad, source="x/model.json")
    assert info.falls_back(15.0) and not info.falls_back(15.9999) and not info.falls_back(16.0)
