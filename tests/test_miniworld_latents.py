"""The miniature model's sampling patch starts an empty latent from the world's mean colour and
leaves real latents alone: img2img, the kept region of inpainting and the second stage of a
two-stage KSamplerAdvanced run keep their colours (issue 16, finding 8). Stock ComfyUI nodes,
in-process, on the shipped miniature model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nodes
from miniworld import world
from miniworld.model import DATA_MEAN, LATENT_SCALE, PixelVAE, load_world, model_space_to_pictures

STEPS, CFG = 12, 5.0


@pytest.fixture(scope="module")
def mini():
    model, clip, vae = load_world()
    encode = nodes.CLIPTextEncode()
    return model, vae, encode.encode(clip, "a red circle")[0], encode.encode(clip, "")[0]


def picture_latent(vae: PixelVAE) -> dict:
    """VAE Encode of a rendered world picture (a yellow snowman), seen at 128 x 128."""
    picture = torch.from_numpy(world.render(world.Scene("snowman", "yellow", False), np.random.default_rng(3)))
    pixels = torch.nn.functional.interpolate(picture[None], scale_factor=8, mode="nearest").permute(0, 2, 3, 1)
    return {"samples": vae.encode(pixels)}


def mean_colour(latent: dict) -> torch.Tensor:
    return model_space_to_pictures(latent["samples"].float() * LATENT_SCALE).mean(dim=(0, 2, 3))


def test_noise_scaling_touches_only_empty_latents(mini):
    """A real latent is noised exactly as SD1 noises it; an all-zero (empty) latent starts from the
    world's mean with centred noise; in a batch of both, each item by its own latent."""
    import comfy.model_sampling

    model = mini[0]
    sampling = model.get_model_object("model_sampling")
    sigma = torch.tensor(3.0)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    real = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    latents = torch.cat([real, torch.zeros_like(real)])
    scaled = sampling.noise_scaling(sigma, noise.clone(), latents)
    plain = comfy.model_sampling.EPS.noise_scaling(sampling, sigma, noise[:1].clone(), real)
    assert torch.equal(scaled[:1], plain)
    empty = scaled[1]
    assert torch.allclose(empty.mean(dim=(-2, -1)), torch.tensor(DATA_MEAN), atol=1e-5)
    assert torch.allclose(empty - empty.mean(dim=(-2, -1), keepdim=True),
                          3.0 * (noise[1] - noise[1].mean(dim=(-2, -1), keepdim=True)), atol=1e-5)


def test_img2img_keeps_the_pictures_colour(mini):
    """KSampler at denoise 0.25 on a VAE-encoded picture: its mean colour stays within 0.03."""
    model, vae, positive, negative = mini
    latent = picture_latent(vae)
    (out,) = nodes.KSampler().sample(model, 5, STEPS, CFG, "euler", "normal", positive, negative, latent, denoise=0.25)
    assert torch.allclose(mean_colour(out), mean_colour(latent), atol=0.03), (mean_colour(out), mean_colour(latent))


def test_inpainting_model_sees_the_kept_region_noised_as_sd1_noises_it(mini):
    """Set Latent Noise Mask over the left half: at every step the right half the model is given is
    the picture plus sigma x the sampler's noise, nothing added (the region sampling draws around)."""
    import comfy.sample

    model, vae, positive, negative = mini
    latent = picture_latent(vae)
    mask = torch.zeros(1, 128, 128)
    mask[:, :, :64] = 1.0
    (masked,) = nodes.SetLatentNoiseMask().set_mask(latent, mask)
    seen = []

    def record(apply_model, args):
        seen.append((args["input"].clone(), args["timestep"].clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    watched = model.clone()
    watched.set_model_unet_function_wrapper(record)
    nodes.KSampler().sample(watched, 5, STEPS, CFG, "euler", "normal", positive, negative, masked, denoise=0.6)
    picture = latent["samples"] * LATENT_SCALE
    noise = comfy.sample.prepare_noise(latent["samples"], 5)
    assert len(seen) == STEPS
    for x, sigma in seen:
        expected = picture + sigma.reshape(-1, 1, 1, 1) * noise
        assert torch.allclose(x[..., 8:], expected[..., 8:], atol=1e-4), (float(sigma[0]), (x - expected)[..., 8:].abs().max())


def test_two_stage_ksampler_advanced_equals_one_run(mini):
    """Steps 0-6 returned with leftover noise, then 6-12 without adding noise: the same latent as
    one KSamplerAdvanced run over the 12 steps (ComfyUI's latent round trip rounds; nothing more)."""
    model, vae, positive, negative = mini
    (empty,) = nodes.EmptyLatentImage().generate(128, 128, 2)
    advanced = nodes.KSamplerAdvanced()
    (whole,) = advanced.sample(model, "enable", 9, STEPS, CFG, "euler", "normal", positive, negative, empty, 0, STEPS, "disable")
    (first,) = advanced.sample(model, "enable", 9, STEPS, CFG, "euler", "normal", positive, negative, empty, 0, 6, "enable")
    (second,) = advanced.sample(model, "disable", 9, STEPS, CFG, "euler", "normal", positive, negative, first, 6, STEPS,
                                "disable")
    assert torch.allclose(second["samples"], whole["samples"], atol=1e-4), (second["samples"] - whole["samples"]).abs().max()
