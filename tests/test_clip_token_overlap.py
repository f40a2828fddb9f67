"""The token overlap of Facilitated Transport with the real CLIP tokenizer: ComfyUI's bundled SD1
tokenizer, whose BPE vocabulary gives prompts their real token overlap."""

from spm_core.transport import content_tokens, token_overlap

BOS, EOS = 49406, 49407


def clip_token_ids(text):
    """Token ids from ComfyUI's bundled SD1 CLIP tokenizer (the real BPE vocabulary)."""
    from comfy.sd1_clip import SDTokenizer

    return [token for chunk in SDTokenizer().tokenize_with_weights(text) for token, _weight in chunk]


def test_token_overlap_with_the_real_clip_tokenizer_ignores_special_tokens():
    concept = content_tokens(clip_token_ids("snoopy"), {BOS, EOS})
    prompt = content_tokens(clip_token_ids("a photo of snoopy on a skateboard"), {BOS, EOS})
    unrelated = content_tokens(clip_token_ids("a bowl of fruit"), {BOS, EOS})
    raw_unrelated = frozenset(clip_token_ids("a bowl of fruit"))
    raw_concept = frozenset(clip_token_ids("snoopy"))
    assert BOS in raw_concept and EOS in raw_concept, "the tokenizer pads with BOS/EOS"
    assert concept and BOS not in concept and EOS not in concept
    assert token_overlap(prompt, concept) == 1.0
    assert token_overlap(unrelated, concept) == 0.0
    assert token_overlap(raw_unrelated, raw_concept) > 0.0, "with special tokens kept, unrelated prompts would overlap"
    two_words = content_tokens(clip_token_ids("van gogh"), {BOS, EOS})
    half = content_tokens(clip_token_ids("a painting by vincent van dyck"), {BOS, EOS})
    assert 0.0 < token_overlap(half, two_words) < 1.0
