"""CaLID networks: shapes through tau1 -> tau2 -> denoiser, zero-init, explicit shape checks."""

import pytest
import torch

from bundle.networks import PRESETS, build_autoencoder, build_denoiser, build_networks, count_parameters, preset

CASES = [(2, (32, 32)), (3, (32, 32, 8))]


def tiny_networks(spatial_dims):
    net = preset("tiny")
    return (net, *build_networks(spatial_dims, net))


@pytest.mark.parametrize("spatial_dims,size", CASES, ids=["2D", "2D+T"])
def test_shapes_through_tau1_tau2_denoiser(spatial_dims, size):
    torch.manual_seed(0)
    net, vae, denoiser = tiny_networks(spatial_dims)
    images = torch.rand(3, 1, *size)
    recon, z_mu, z_sigma = vae(images)
    latent_size = tuple(s // 4 for s in size)  # f = 4 on every axis
    assert recon.shape == images.shape
    assert z_mu.shape == (3, net["latent_channels"], *latent_size)
    neighbours = torch.rand(3, 2, *size)
    embedding = denoiser.tau1(neighbours)
    assert embedding.shape == (3, net["unet_channels"][0], *latent_size)  # tau1: image -> latent grid
    down, mid = denoiser.control(x=z_mu, timesteps=torch.tensor([1, 500, 999]), controlnet_cond=neighbours)
    assert len(down) == 1 + len(net["unet_channels"]) * net["unet_res_blocks"] + len(net["unet_channels"]) - 1
    eps = denoiser(z_mu, torch.tensor([1, 500, 999]), neighbours)
    assert eps.shape == z_mu.shape


@pytest.mark.parametrize("spatial_dims,size", CASES, ids=["2D", "2D+T"])
def test_conditioning_adds_exactly_nothing_at_init(spatial_dims, size):
    torch.manual_seed(1)
    _, _, denoiser = tiny_networks(spatial_dims)
    z = torch.randn(2, 2, *(s // 4 for s in size))
    t = torch.tensor([10, 900])
    neighbours = torch.rand(2, 2, *size)
    assert torch.count_nonzero(denoiser.tau1(neighbours)) == 0  # tau1 ends in a zero conv
    down, mid = denoiser.control(x=z, timesteps=t, controlnet_cond=neighbours)
    assert all(torch.count_nonzero(d) == 0 for d in down) and torch.count_nonzero(mid) == 0
    torch.testing.assert_close(denoiser(z, t, neighbours), denoiser.unet(z, t), rtol=0, atol=0)
    # training opens the zero convs (one per step): gradients reach tau1 through tau2
    target = torch.randn_like(z)
    optimizer = torch.optim.SGD(denoiser.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (denoiser(z, t, neighbours) - target).pow(2).mean().backward()
        optimizer.step()
    assert torch.count_nonzero(denoiser.tau1(neighbours)) > 0
    down, mid = denoiser.control(x=z, timesteps=t, controlnet_cond=neighbours)
    assert all(torch.count_nonzero(d) > 0 for d in down) and torch.count_nonzero(mid) > 0


def test_shape_mismatch_is_an_error_not_a_resize():
    _, _, denoiser = tiny_networks(2)
    with pytest.raises(ValueError, match="conditioning must be"):
        denoiser(torch.randn(1, 2, 8, 8), torch.tensor([5]), torch.rand(1, 2, 30, 32))
    with pytest.raises(ValueError, match="conditioning must be"):
        denoiser(torch.randn(1, 2, 8, 8), torch.tensor([5]), torch.rand(1, 3, 32, 32))


def test_tau1_must_match_vae_factor():
    net = preset("tiny")
    net["tau1_channels"] = [8, 16]
    with pytest.raises(ValueError, match="downsample by the VAE factor 4"):
        build_denoiser(2, net)


@pytest.mark.parametrize("name", list(PRESETS))
def test_vae_has_no_attention_and_factor_four(name):
    net = preset(name)
    assert len(net["vae_channels"]) == 3  # f = 2 ** (3 - 1) = 4
    vae = build_autoencoder(2, net["vae_channels"], net["latent_channels"], 1, net["vae_norm_groups"])
    names = {type(m).__name__ for m in vae.modules()}
    assert not any("Attention" in n or "Transformer" in n for n in names), names
    assert count_parameters(vae) > 0


def test_preset_unknown():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
