"""The benchmarks and figure commands run and report (no timing thresholds: figures, not tests)."""

import json

from bundle.cli import main


def test_inference_benchmark_reports(capsys):
    main(["benchmark", "--preset", "tiny", "--slices", "3", "--phases", "2", "--size", "32", "--steps", "1"])
    result = json.loads(capsys.readouterr().out)
    assert result["generated_slices"] == 2 * 3 * 2
    for mode in ("batched", "per-slice loop"):
        assert result[mode]["seconds"] > 0 and result[mode]["peak_rss_mb"] > 0
    assert result["per-slice loop"]["chunk_size"] == 1


def test_training_benchmark_reports(capsys):
    main(["train-speed", "--preset", "tiny", "--iterations", "1", "--batch-size", "2"])
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    assert result["preset"] == "tiny" and result["batch_size"] == 2
    # the counts of the preset's own networks (not a figure pinned to MONAI's internals)
    from bundle.networks import build_discriminator, build_networks, count_parameters, preset

    net = preset("tiny")
    vae, denoiser = build_networks(2, net)
    assert result["vae_parameters"] == count_parameters(vae)
    assert result["denoiser_parameters"] == count_parameters(denoiser.unet)
    disc = build_discriminator(2, net["disc_channels"], net["disc_layers"])
    assert result["discriminator_parameters"] == count_parameters(disc)
    assert result["autoencoder_seconds_per_iteration"] > 0 and result["diffusion_seconds_per_iteration"] > 0


def test_plot_training_draws_the_logs(tmp_path, capsys):
    import shutil

    import pytest
    from conftest import ROOT
    from PIL import Image

    run = tmp_path / "autoencoder"
    run.mkdir()
    figures = ROOT / "docs" / "figures"
    shutil.copy(figures / "h200_short_run_autoencoder_train_log.csv", run / "train_log.csv")
    shutil.copy(figures / "h200_short_run_autoencoder_validation.csv", run / "validation.csv")
    main(["plot-training", str(tmp_path / "curves.png"), str(run)])
    assert Image.open(tmp_path / "curves.png").size == (1280, 360)
    with pytest.raises(SystemExit):
        main(["plot-training", str(tmp_path / "curves.png"), str(run)])
    assert "exists" in capsys.readouterr().err
