"""DDIM from one explicit timestep list, checked against an independent float64 reference."""

import numpy as np
import pytest
import torch

from bundle.sampling import DDIM, ddim_timesteps, make_noise_scheduler, slerp


def test_timestep_list():
    assert ddim_timesteps(1000, 8) == [999, 874, 749, 624, 499, 374, 249, 124]
    assert ddim_timesteps(1000, 1) == [999]
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


def reference_ddim(alphas, timesteps, eps_fn, z, invert=False):
    """Textbook DDIM (eta = 0) in float64 numpy, written independently of bundle.sampling."""
    prev = timesteps[1:] + [-1]
    pairs = list(zip(timesteps, prev))

    def abar(t):
        return 1.0 if t < 0 else float(alphas[t])

    z = z.astype(np.float64)
    if not invert:
        for t, tp in pairs:
            e = eps_fn(z, t)
            x0 = (z - np.sqrt(1 - abar(t)) * e) / np.sqrt(abar(t))
            z = np.sqrt(abar(tp)) * x0 + np.sqrt(1 - abar(tp)) * e
    else:
        for t, tp in reversed(pairs):
            e = eps_fn(z, t)
            x0 = (z - np.sqrt(1 - abar(tp)) * e) / np.sqrt(abar(tp))
            z = np.sqrt(abar(t)) * x0 + np.sqrt(1 - abar(t)) * e
    return z


@pytest.mark.parametrize("steps", [1, 2, 8, 32])
def test_sample_and_invert_match_reference(steps):
    alphas = make_noise_scheduler().alphas_cumprod
    ddim = DDIM(alphas, steps)
    z = np.random.default_rng(0).normal(size=(2, 3, 4, 4))

    def eps_np(x, t):
        return 0.3 * np.tanh(x) + t / 2000.0

    def eps_torch(x, t):
        return 0.3 * torch.tanh(x) + t / 2000.0

    for invert in (False, True):
        expected = reference_ddim(alphas.double().numpy(), ddim_timesteps(1000, steps), eps_np, z, invert)
        run = ddim.invert if invert else ddim.sample
        got = run(eps_torch, torch.from_numpy(z)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_invert_then_sample_reconstructs():
    """With a noise predictor that is consistent with its data (the optimum for a Gaussian-like
    latent distribution, plus a mild non-linearity), inversion followed by sampling along the
    same timestep pairs returns to the start; the error shrinks as the steps grow."""
    alphas = make_noise_scheduler().alphas_cumprod.double()

    def eps_fn(z, t):
        s = (1 - alphas[t]) ** 0.5
        return s * (0.9 * z + 0.1 * torch.tanh(z))

    z0 = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors = {}
    for steps in (4, 50, 500):
        ddim = DDIM(alphas, steps)
        errors[steps] = float((ddim.sample(eps_fn, ddim.invert(eps_fn, z0)) - z0).abs().max())
    # first-order convergence (measured: 0.309, 0.0465, 0.0048); the timestep list and its
    # pairs themselves are pinned by test_sample_and_invert_match_reference
    assert errors[500] < 0.02 and errors[50] / errors[500] > 5 and errors[4] > errors[50], errors


def test_refine_path_runs_and_is_deterministic(tiny_weights_2d):
    from bundle.weights import load_model

    model = load_model(tiny_weights_2d)
    neighbours = torch.rand(2, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    sampler = model.sampler(3)
    a = sampler(neighbours, refine=True)
    b = sampler(neighbours, refine=True)
    assert a.shape == (2, 1, 32, 32) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_slerp():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid, torch.tensor([[2**-0.5, 2**-0.5]]))
    torch.testing.assert_close(slerp(a, a, 0.5), a)  # parallel: no division by sin(0)
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)
    x = torch.randn(3, 2, 4, 4)
    y = torch.randn(3, 2, 4, 4)
    assert torch.isfinite(slerp(x, y)).all()
    torch.testing.assert_close(slerp(x, y, 0.0), x)
    torch.testing.assert_close(slerp(x, y, 1.0), y)


@pytest.mark.parametrize("refine", [False, True])
def test_residual_prediction_starts_exactly_at_linear(refine):
    """A freshly initialised residual model (zero output conv) predicts the linear blend."""
    from bundle.networks import build_networks, preset
    from bundle.sampling import SliceSampler

    torch.manual_seed(0)
    vae, denoiser = build_networks(2, preset("tiny"))
    neighbours = torch.rand(3, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    sampler = SliceSampler(vae.eval(), denoiser.eval(), 1.3, num_steps=4, prediction="residual")
    out = sampler(neighbours, refine=refine, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, neighbours.mean(1, keepdim=True), rtol=0, atol=1e-6)
    epsilon_model = SliceSampler(vae.eval(), denoiser.eval(), 1.3, num_steps=4, prediction="epsilon")
    assert (epsilon_model(neighbours) - neighbours.mean(1, keepdim=True)).abs().max() > 0.1  # not so for epsilon


def test_unknown_prediction():
    from bundle.sampling import SliceSampler

    with pytest.raises(ValueError, match="prediction must be one of"):
        SliceSampler(None, None, 1.0, prediction="velocity")


def test_sample_is_the_inference_call_with_gradients(tiny_weights_2d):
    """``sample`` returns exactly what ``__call__`` returns, and lets gradients reach the
    denoiser and the conditioning (a flow-correction head is trained through a frozen denoiser
    this way); ``__call__`` keeps no graph."""
    from bundle.weights import load_model

    sampler = load_model(tiny_weights_2d).sampler(1)
    neighbours = torch.rand(2, 2, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    z_start = torch.zeros(sampler.latent_shape(neighbours))
    inferred = sampler(neighbours, z_start=z_start, gap_mm=16.0)
    assert not inferred.requires_grad
    out = sampler.sample(neighbours, z_start=z_start, gap_mm=16.0)
    torch.testing.assert_close(out.detach(), inferred, rtol=0, atol=0)
    out.square().sum().backward()
    assert neighbours.grad.abs().sum() > 0
    assert sum(float(p.grad.abs().sum()) for p in sampler.denoiser.parameters() if p.grad is not None) > 0
