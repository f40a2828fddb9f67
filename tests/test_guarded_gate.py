"""The guarded gate: after the latent gate, a second look-ahead with the membranes open; where the
concept still forms, the prompt is moved towards the concept's own words, which the membrane erases.

On the tiny worlds (random membranes) the breach ramp is moved so that every prompt that opens a
membrane breaches fully, or none does, and what is sampled is compared with what the same model
samples for the concept's words through an open membrane, or with the latent gate."""

from __future__ import annotations

import pytest
import torch
from pack import encode, load_spm, pack_module, sample
from test_batch_layouts import sdxl_world  # noqa: F401 (a fixture)

import nodes

ALWAYS = (-1.0, -0.99)  # the breach ramp: every cosine breaches fully
NEVER = (0.999, 1.0)  # no open membrane leaves a prompt's prediction that close to the bare concept's


@pytest.fixture(autouse=True)
def _unload_after_each_test():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()  # other tests count the hooks on the shared tiny UNet


def state_of(model):
    return pack_module("nodes.runtime").state_of(model)


def with_breach_ramp(model, ramp: tuple[float, float]):
    transport = state_of(model).entries[0].transport
    transport.breach_threshold, transport.breach_saturation = ramp
    return model


def guarded(patcher, clip, membrane: str, ramp: tuple[float, float], **options):
    return with_breach_ramp(load_spm(patcher, clip, membrane, transport="guarded", **options), ramp)


def concept_words(model) -> list:
    """CONDITIONING of the membrane's concept prompt as its transport holds it (what a breach reads)."""
    transport = state_of(model).entries[0].transport
    options = {} if transport.concept_pooled is None else {"pooled_output": transport.concept_pooled[:1]}
    return [[transport.concept_embeddings[:1], options]]


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-2 * b.abs().max())


def breaches_of_last_run(model) -> list[float]:
    return sorted(float(breach.max()) for breach, _ in state_of(model)._breaches.values())


def test_a_breached_prompt_is_sampled_as_the_concepts_words_behind_the_open_membrane(spm_world):
    patcher, clip, _ = spm_world
    prompt, negative = encode(clip, "a photo of snoopy"), encode(clip, "blurry")
    model = guarded(patcher, clip, "snoopy.safetensors", ALWAYS)
    breached = sample(model, prompt, negative)
    assert breaches_of_last_run(model) == [1.0]
    open_on_words = sample(load_spm(patcher, clip, "snoopy.safetensors", transport="always_open"), concept_words(model), negative)
    assert torch.equal(breached, open_on_words)
    behind_latent_gate = sample(load_spm(patcher, clip, "snoopy.safetensors", transport="latent"), prompt, negative)
    assert differs(breached, behind_latent_gate), "the breach changed nothing"


def test_without_a_breach_the_guarded_gate_samples_as_the_latent_gate(spm_world):
    """No breach: the prompt that opens the membrane but does not breach it, and the prompt that opens
    nothing (a breach is never larger than the gate, so it is not even looked at), sample bit for bit
    as behind the latent gate."""
    patcher, clip, _ = spm_world
    negative = encode(clip, "blurry")
    latent = load_spm(patcher, clip, "snoopy.safetensors", transport="latent")
    for text, ramp in (("a photo of snoopy", NEVER), ("a bowl of fruit", ALWAYS)):
        model = guarded(patcher, clip, "snoopy.safetensors", ramp)
        guarded_out = sample(model, encode(clip, text), negative)
        assert breaches_of_last_run(model) == [0.0], text
        assert torch.equal(guarded_out, sample(latent, encode(clip, text), negative)), text


def test_a_negative_prompt_is_never_replaced(spm_world):
    """With the membrane on both rows and the concept in both prompts, the positive prompt breaches and
    is replaced; the negative prompt keeps its own words behind its open membrane."""
    patcher, clip, _ = spm_world
    prompt, negative = encode(clip, "a photo of snoopy"), encode(clip, "snoopy, blurry")
    model = guarded(patcher, clip, "snoopy.safetensors", ALWAYS, rows="positive and negative")
    breached = sample(model, prompt, negative)
    open_both = load_spm(patcher, clip, "snoopy.safetensors", transport="always_open", rows="positive and negative")
    assert torch.equal(breached, sample(open_both, concept_words(model), negative))
    assert differs(breached, sample(open_both, concept_words(model), concept_words(model)))


def test_sdxl_a_breached_row_reads_the_concepts_pooled_vector_too(sdxl_world):  # noqa: F811 (the fixture)
    patcher, clip = sdxl_world
    prompt, negative = encode(clip, "snoopy on a hill"), encode(clip, "blurry")
    model = guarded(patcher, clip, "snoopy_xl.safetensors", ALWAYS)
    latent = dict(samples=torch.zeros(1, 4, 8, 8))
    (breached,) = nodes.KSampler().sample(model, 1, 2, 5.0, "euler", "normal", prompt, negative, latent)
    words = concept_words(model)
    assert words[0][1]["pooled_output"].shape[-1] > 0
    open_model = load_spm(patcher, clip, "snoopy_xl.safetensors", transport="always_open")
    (expected,) = nodes.KSampler().sample(open_model, 1, 2, 5.0, "euler", "normal", words, negative, latent)
    assert torch.equal(breached["samples"], expected["samples"])
    without_pooled = [[words[0][0], {"pooled_output": prompt[0][1]["pooled_output"]}]]
    (other,) = nodes.KSampler().sample(open_model, 1, 2, 5.0, "euler", "normal", without_pooled, negative, latent)
    assert differs(other["samples"], expected["samples"]), "the pooled vector changes nothing here"


def test_a_breach_ramp_out_of_order_is_refused():
    from spm_core.errors import SPMError
    from spm_core.transport import ConceptEmbedding, Transport, TransportMode

    concept = ConceptEmbedding(torch.randn(77, 8))
    with pytest.raises(SPMError, match="guarded transport needs threshold < saturation"):
        Transport([[concept]], TransportMode.GUARDED, empty=torch.zeros(77, 8), breach_threshold=0.7, breach_saturation=0.6)


def test_the_inspector_shows_the_breach_that_sampling_measures(spm_world):
    from pack import node

    patcher, clip, _ = spm_world
    (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
    inspector = node("SPMTransportInspector")
    for ramp, shown in ((ALWAYS, "1.000 (breach 1.00)"), (NEVER, "1.000")):
        model = guarded(patcher, clip, "snoopy.safetensors", ramp)
        table = inspector.execute(model, encode(clip, "a photo of snoopy"), encode(clip, "a bowl of fruit"), latent, 3).result[0]
        cells = table.splitlines()[-1].split("  ")
        assert [cell.strip() for cell in cells if cell.strip()][-2:] == [shown, "0.000"], table


def test_a_partly_open_membrane_moves_its_prompt_partly_and_meets_it_fully_open(spm_world):
    """A prompt that opens the membrane halfway (its text gate; the latent gate kept shut) and breaches
    fully is moved halfway to the concept's words, never further than the gate, and that row meets
    the membrane fully open: the words in it must be erased, not half erased."""
    patcher, clip, _ = spm_world
    (prompt,) = nodes.CLIPTextEncode().encode(clip, "a photo of snoopy")  # no token ids: the cosine alone
    negative = encode(clip, "blurry")
    model = guarded(patcher, clip, "snoopy.safetensors", ALWAYS)
    transport = state_of(model).entries[0].transport
    transport.latent_threshold, transport.latent_saturation = 0.999, 1.0
    transport.threshold, transport.saturation = -1.0, 1.0
    cosine = 2 * float(transport.gates(prompt[0][0].float())[0, 0]) - 1
    transport.threshold, transport.saturation = cosine - 0.1, cosine + 0.1  # the text gate at 0.5
    assert float(transport.gates(prompt[0][0].float())[0, 0]) == pytest.approx(0.5, abs=1e-4)
    moved = sample(model, prompt, negative)
    (breach,) = state_of(model).measured_breaches()
    assert float(breach[0, 0]) == pytest.approx(0.5, abs=1e-4)
    halfway = [[torch.lerp(prompt[0][0], concept_words(model)[0][0].to(prompt[0][0]), breach[0, 0].to(prompt[0][0])), {}]]
    open_model = load_spm(patcher, clip, "snoopy.safetensors", transport="always_open")
    assert torch.equal(moved, sample(open_model, halfway, negative))
