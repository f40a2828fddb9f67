"""The miniature DiT world (miniworld.dit): a tiny Flux built from ComfyUI's classes with Flux's own
text encoders, its training-time encoders, its VAE in Flux's latent format, and the binding of
membranes to it."""

from __future__ import annotations

import torch

from miniworld import dit
from miniworld.model import PixelVAE, model_space_to_pictures, pictures_to_model_space

PROMPTS = ["a red circle", "a striped snow man", ""]


def initialised_clip():
    clip = dit.build_clip()
    clip_l = dit.clip_l_transformer(clip).text_model
    for offset, module in enumerate((dit.t5(clip), clip_l.encoder, clip_l.final_layer_norm,
                                     clip_l.embeddings.position_embedding)):
        dit.init_for_training_(module, offset)
    with torch.no_grad():  # trained norms are not all ones: a wrong layer order would show
        for p in dit.t5(clip).parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return clip


def test_training_encoders_match_comfyuis_forward():
    clip = initialised_clip()
    ids = [dit.token_ids(clip, p) for p in PROMPTS]
    t5_ids, clip_ids = torch.tensor([i[0] for i in ids]), torch.tensor([i[1] for i in ids])
    assert t5_ids.shape == (3, dit.T5_TOKENS), "T5 pads to the world's window through ComfyUI's tokenizer option"
    context, pooled = dit.encode_t5(clip, t5_ids), dit.pooled_clip(clip, clip_ids)
    comfy = [clip.encode_from_tokens(clip.tokenize(p), return_pooled=True) for p in PROMPTS]
    assert torch.allclose(context, torch.cat([c for c, _ in comfy]), atol=1e-5)
    assert torch.allclose(pooled, torch.cat([p for _, p in comfy]), atol=1e-5)
    assert not torch.allclose(context[0], context[1], atol=1e-3)


def test_training_encoders_give_gradients_to_every_trained_parameter():
    clip = initialised_clip()
    for module in (dit.t5(clip), dit.clip_l_transformer(clip)):  # as lab.train_model does (ComfyUI builds them frozen)
        for name, p in module.named_parameters():
            p.requires_grad_(not dit.is_frozen_text(name))
    ids = dit.token_ids(clip, "a blue cross")
    with torch.enable_grad():  # ComfyUI's test host runs with gradients off
        loss = dit.encode_t5(clip, torch.tensor([ids[0]])).square().mean() + \
            dit.pooled_clip(clip, torch.tensor([ids[1]])).square().mean()
    loss.backward()
    for prefix, module in (("t5", dit.t5(clip)), ("clip_l", dit.clip_l_transformer(clip))):
        for name, p in module.named_parameters():
            if dit.is_frozen_text(name):
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{prefix}.{name} gets no gradient"


def test_pixel_vae_speaks_fluxs_latent_format():
    """The VAE's latent, read through ComfyUI's own Flux latent format (what the samplers do), holds the
    picture's RGB in [-1, 1] in channels 0-2 and zeros elsewhere; decoding returns the picture."""
    import comfy.latent_formats

    pictures = torch.rand(2, 3, 16, 16)
    vae = PixelVAE(channels=dit.CHANNELS, scale=dit.LATENT_SCALE, shift=dit.LATENT_SHIFT)
    pixels = torch.nn.functional.interpolate(pictures, scale_factor=8, mode="nearest").permute(0, 2, 3, 1)
    latent = vae.encode(pixels)
    assert latent.shape == (2, 16, 16, 16)
    model_space = comfy.latent_formats.Flux().process_in(latent)
    assert torch.allclose(model_space, pictures_to_model_space(pictures, dit.CHANNELS), atol=1e-5)
    assert torch.allclose(model_space_to_pictures(model_space), pictures, atol=1e-5)
    assert torch.allclose(vae.decode(latent), pixels, atol=1e-5)


def test_membranes_bind_to_the_text_stream_as_on_flux():
    import comfy.model_management as mm
    import comfy.model_patcher
    from pack import pack_module

    architectures = pack_module("nodes.architectures")
    model = dit.build_dit()
    dit.init_for_training_(model.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    assert architectures.model_family(patcher) == architectures.FLUX
    key_map, shapes = architectures.membrane_layers(patcher)
    modules = set(key_map.values())
    # txt_in and, in each of the 2 double blocks, txt_attn.qkv, txt_attn.proj, txt_mlp.0 and txt_mlp.2; in each
    # of the 2 single blocks linear1 and linear2 (on the text tokens, when a membrane adapts them)
    assert modules == {"diffusion_model.txt_in"} | {f"diffusion_model.double_blocks.{b}.{m}" for b in range(2)
                                                    for m in ("txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")} \
        | {f"diffusion_model.single_blocks.{b}.{m}" for b in range(2) for m in ("linear1", "linear2")}
    assert shapes["diffusion_model.txt_in"][:2] == (128, 128)


def test_an_attacks_t5_tokens_in_their_frame_are_what_comfyui_encodes_for_the_typed_words():
    """The DiT world's prompt space (lab/prompt_spaces.py): the free tokens sit where ComfyUI's T5
    tokenizer puts the words they stand for, the padding after them as Flux pads; the pooled vector
    is CLIP-L's for the words around them."""
    from lab.attack import AttackSettings, conditioning_of, content_ids

    clip = initialised_clip()
    words = dit.t5(clip).shared(torch.tensor(content_ids(clip, "red circle")), out_dtype=torch.float32)
    settings = AttackSettings(before="a", after="on a dark background")
    ((context, options),) = conditioning_of(clip, settings, words)
    comfy, _ = clip.encode_from_tokens(clip.tokenize("a red circle on a dark background"), return_pooled=True)
    _, around = clip.encode_from_tokens(clip.tokenize("a on a dark background"), return_pooled=True)
    assert context.shape == comfy.shape == (1, dit.T5_TOKENS, 128)
    assert torch.allclose(context, comfy, atol=1e-5)
    assert torch.allclose(options["pooled_output"], around, atol=1e-5)


def test_the_shipped_dit_loads_through_its_node_and_draws_what_it_is_asked():
    """The example node's MODEL, CLIP and VAE, sampled with stock nodes as its description says
    (EmptyLatentImage 128x128, KSampler euler 20 steps cfg 5, VAE Decode), give clean pictures of the
    objects the prompts name, read by the classifier (trained on renders only, never on generations).
    The floor guards the loading and sampling path, not quality: the miniature DiT draws triangles
    and squares poorly (the benchmark's --world dit --bare: 39% and 51%; 73% of all prompts' concepts),
    so this once read 19 of 24 here; a broken path reads near 0 (an untrained model draws noise)."""
    import nodes
    from miniworld.classifier import classify, load_classifier
    from miniworld.comfy_nodes import LoadMiniatureDiT
    from miniworld.model import CLASSIFIER_FILE

    model, clip, vae = LoadMiniatureDiT.execute().result
    assert type(model.model.model_config).__name__ == "Flux"
    classifier = load_classifier(CLASSIFIER_FILE)
    prompts = {"a snowman": "snowman", "a red circle": "circle", "a blue triangle": "triangle", "a house": "house",
               "a yellow cross": "cross", "a mushroom": "mushroom"}
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    found, clean = [], []
    for text, obj in prompts.items():
        (positive,) = nodes.CLIPTextEncode().encode(clip, text)
        (latent,) = nodes.EmptyLatentImage().generate(128, 128, 4)
        (out,) = nodes.KSampler().sample(model, 0, 20, 5.0, "euler", "normal", positive, negative, latent)
        (image,) = nodes.VAEDecode().decode(vae, out)
        assert image.shape == (4, 128, 128, 3)
        verdicts = classify(classifier, vae.pictures(out["samples"]))
        found += [v.obj == obj and v.is_clean for v in verdicts]
        clean += [v.is_clean for v in verdicts]
    assert sum(clean) >= 0.8 * len(clean), f"{sum(clean)} of {len(clean)} generations are clean pictures"
    assert sum(found) >= 0.5 * len(found), f"{sum(found)} of {len(found)} generations show what was asked"
