"""Benchmarks that print figures (no thresholds): training speed and parameter counts."""

from __future__ import annotations

import time

import torch

from .devices import resolve_device
from .engines import AutoencoderTrainer, LatentDiffusionTrainer, LatentScale, make_ema
from .errors import InputRefused
from .losses import PerceptualTerm
from .networks import build_discriminator, build_networks, count_parameters
from .networks import preset as preset_sizes
from .options import _fraction, as_flag
from .sampling import make_noise_scheduler


def _synthetic_batch(net, temporal, batch_size, device):
    size = list(net["spatial_size"]) + ([net["num_frames"]] if temporal else [])
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(batch_size, 1, *size, generator=g).to(device),
        "neighbours": torch.rand(batch_size, 2, *size, generator=g).to(device),
    }


def _time_iterations(trainer, batch, iterations, device):
    trainer._iteration(trainer, batch)  # warm-up (allocations, cuDNN autotune)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        trainer.state.iteration += 1
        trainer._iteration(trainer, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations


def training_speed(preset="cpu", iterations=3, device="auto", temporal=False, batch_size=None):
    """Benchmark training: parameter counts and seconds per iteration of both stages.

    Args:
        preset: the network sizes (tiny, cpu, paper), with random weights.
        iterations: timed iterations per stage, after one warm-up.
        device: auto, cpu, cuda or cuda:N.
        temporal: the 2D+T variant.
        batch_size: default: the preset's.
    """
    device, temporal = resolve_device(device), as_flag(temporal, "temporal")
    net = preset_sizes(preset)
    batch_size = batch_size or net["batch_size"]
    dims = 3 if temporal else 2
    vae, denoiser = (module.to(device) for module in build_networks(dims, net))
    disc = build_discriminator(dims, net["disc_channels"], net["disc_layers"]).to(device)
    batch = _synthetic_batch(net, temporal, batch_size, device)
    common = dict(device=device, max_epochs=1, train_data_loader=[batch])
    ae_trainer = AutoencoderTrainer(
        network=vae,
        optimizer=torch.optim.Adam(vae.parameters(), 1e-4),
        discriminator=disc,
        d_optimizer=torch.optim.Adam(disc.parameters(), 1e-4),
        perceptual=PerceptualTerm().to(device),
        ema=make_ema(vae),
        **common,
    )
    ldm_trainer = LatentDiffusionTrainer(
        network=denoiser,
        optimizer=torch.optim.Adam(denoiser.parameters(), 1e-4),
        autoencoder=vae,
        noise_scheduler=make_noise_scheduler(),
        latent_scale=LatentScale(),
        ema=make_ema(denoiser),
        **common,
    )
    result = {
        "preset": preset,
        "variant": "2D+T" if temporal else "2D",
        "device": str(device),
        "batch_size": batch_size,
        "input_size": list(batch["image"].shape[2:]),
        "vae_parameters": count_parameters(vae),
        "discriminator_parameters": count_parameters(disc),
        "denoiser_parameters": count_parameters(denoiser.unet),
        "conditioning_parameters": count_parameters(denoiser.control),
        "autoencoder_seconds_per_iteration": _time_iterations(ae_trainer, batch, iterations, device),
        "diffusion_seconds_per_iteration": _time_iterations(ldm_trainer, batch, iterations, device),
    }
    return result


def _random_model(preset, temporal, device):
    """A CaLIDModel with random weights: speed and memory do not depend on the values."""
    from .networks import CaLIDNetwork
    from .weights import CaLIDModel, ModelInfo

    info = ModelInfo("model", 3 if temporal else 2, preset_sizes(preset), preset=preset, latent_scale=1.0)
    return CaLIDModel(CaLIDNetwork.from_info(info).to(device).eval(), info, f"random {preset}")


def _upsample_once(
    model_spec, stack, factor, steps, chunk_size, device_name, precision, method="calid", phase_fusion=0.0
):
    """Runs in a fresh process so that its peak memory is its own. For ``method`` flow,
    ``chunk_size`` 1 means one pair per solve; otherwise the default memory budget decides."""
    import resource

    from .inference import LearnedMidpoints
    from .motion import FlowMidpoints, pairs_per_chunk
    from .temporal import PhaseFusion
    from .upsample import upsample_stack
    from .weights import load_model

    device = resolve_device(device_name)
    if method == "flow":
        predictor = FlowMidpoints(device=device) if chunk_size > 1 else FlowMidpoints(device=device, memory_budget_mb=1)
    else:
        weights, preset, temporal = model_spec
        model = load_model(weights, device=device) if weights else _random_model(preset, temporal, device)
        pre = model.preprocessor(stack)
        predictor = LearnedMidpoints(
            model, pre, num_steps=steps, chunk_size=chunk_size, device=device, precision=precision, fallback=False
        )
    fused = PhaseFusion(predictor, phase_fusion, device=device) if phase_fusion else predictor
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    upsample_stack(stack, factor, fused)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    x, y = stack.shape[:2]
    return {
        "chunk_size": pairs_per_chunk(x, y, predictor.memory_budget_mb) if method == "flow" else chunk_size,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def inference_speed(
    weights=None,
    preset="cpu",
    temporal=False,
    slices=12,
    phases=20,
    size=256,
    factor=4,
    steps=8,
    device="auto",
    chunk_size=None,
    loop=True,
    precision="auto",
    method="calid",
    phase_fusion=0.0,
    slice_mm=8.0,
):
    """Benchmark upsampling: wall time and peak memory on a phantom cine, batched vs a per-slice loop.

    Args:
        weights: a model folder to time (default: random weights of the preset).
        preset: the network sizes of the random model (tiny, cpu, paper).
        temporal: the 2D+T variant.
        slices: slices of the phantom cine.
        phases: phases of the phantom cine.
        size: in-plane size of the phantom (pixels).
        factor: the upsampling factor.
        steps: DDIM steps.
        device: auto, cpu, cuda or cuda:N.
        chunk_size: slices per batch (default 64 on CUDA, 8 on CPU); for flow, 1 means one pair per solve.
        loop: also time the per-slice loop.
        precision: auto, fp32, bf16 or fp16.
        method: calid (the learned model) or flow (flow midpoints).
        phase_fusion: also fuse each new slice over the phases within this fraction of the cycle
            (bundle.temporal; only between neighbours 16 mm apart or more).
        slice_mm: the phantom's slice spacing (mm).
    """
    temporal, loop = as_flag(temporal, "temporal"), as_flag(loop, "loop")
    if method not in ("calid", "flow"):
        raise InputRefused(f"benchmark --method is calid or flow, got {method!r}")
    phase_fusion = _fraction(phase_fusion, "phase fusion")
    import multiprocessing

    from .phantom import make_subject

    device = resolve_device(device)
    stack = make_subject(seed=0, size=size, num_slices=slices, num_phases=phases, sparse_spacing=float(slice_mm)).sparse
    generated = (slices - 1) * (factor - 1) * phases
    chunk_size = chunk_size or (64 if device.type == "cuda" else 8)
    runs = [("batched", chunk_size)] + ([("per-slice loop", 1)] if loop else [])
    context = multiprocessing.get_context("spawn")
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "method": method,
        "model": None if method == "flow" else weights or f"random {preset} ({'2D+T' if temporal else '2D'})",
        "input": f"{slices} slices x {phases} phases x {size}x{size}",
        "factor": factor,
        "steps": steps if method == "calid" else None,
        "phase_fusion": phase_fusion,
        "slice_mm": float(slice_mm),
        "generated_slices": generated,
        "torch_threads": torch.get_num_threads(),
    }
    model_spec = (weights, preset, temporal)
    for name, chunk in runs:
        args = (model_spec, stack, factor, steps, chunk, str(device), precision, method, phase_fusion)
        with context.Pool(1) as pool:
            measured = pool.apply(_upsample_once, args)
        measured["seconds_per_generated_slice"] = measured["seconds"] / generated
        result[name] = measured
    return result
