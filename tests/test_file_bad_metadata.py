"""Metadata that is malformed or contradicts the tensors is refused by name (SPMFileError naming the
file and the problem): rank and alpha, concepts and prompts, architecture, the JSON fields."""

import json

import pytest
from file_helpers import PUBLIC_METADATA, expect_file_error, lora_tensors, write, write_public

from spm_core.concepts import MAX_CONCEPTS
from spm_core.file_format import load_membrane


def test_metadata_rank_contradicts_tensors(tmp_path, sd1):
    path = write_public(tmp_path / "rank.safetensors", sd1, {**PUBLIC_METADATA, "rank": "4"})
    expect_file_error(path, "metadata says rank 4", "[1]")


def test_metadata_rank_not_a_number(tmp_path, sd1):
    path = write_public(tmp_path / "rank_text.safetensors", sd1, {**PUBLIC_METADATA, "rank": "one"})
    expect_file_error(path, "'rank'", "not a whole number")


def test_metadata_alpha_contradicts_alpha_tensors(tmp_path, sd1):
    path = write_public(tmp_path / "alpha.safetensors", sd1, {**PUBLIC_METADATA, "alpha": "4.0"}, alpha=1.0)
    expect_file_error(path, "metadata says alpha 4.0")


def test_metadata_alpha_not_a_number(tmp_path, sd1):
    path = write_public(tmp_path / "alpha_text.safetensors", sd1, {**PUBLIC_METADATA, "alpha": "high"})
    expect_file_error(path, "'alpha'", "not a number")


def test_metadata_alpha_contradicts_default_alpha(tmp_path, sd1):
    """No alpha tensors means alpha = rank; metadata saying otherwise is a contradiction."""
    tensors = lora_tensors(sd1.weight_shapes, rank=4, with_alpha=False)
    path = write(tmp_path / "noalpha.safetensors", tensors, {"rank": "4", "alpha": "1.0"})
    expect_file_error(path, "metadata says alpha 1.0")


@pytest.mark.parametrize("concepts, phrases", [
    ('[{"target": "snoopy"', ("'concepts'", "not valid JSON")),
    ('{"target": "snoopy"}', ("'concepts'", "must be a JSON list")),
    ('"snoopy"', ("must be a JSON list",)),
    ('["snoo\\u0007py"]', ("control characters",)),
    ('[{"target": "snoopy", "aliases": ["peanuts\\u0000dog"]}]', ("alias", "control characters")),
    ('["snoo\u200bpy"]', ("invisible or text-direction characters", "U+200B")),
    ('[{"target": "snoopy", "aliases": ["\u202eypoons"]}]', ("alias", "U+202E")),
    ('["snoopy", ""]', ("concept target", "is empty")),
    ('["snoopy", "   "]', ("is empty",)),
    ('[{"target": ""}]', ("is empty",)),
    ('[{"surrogate": "cat"}]', ("'target'",)),
    ('[{"target": "snoopy", "colour": "red"}]', ("unknown fields", "colour")),
    ('[42]', ("must be a string or an object",)),
    ('[{"target": "snoopy", "aliases": "peanuts"}]', ("aliases", "list")),
    ('[{"target": 7}]', ("must be text",)),
])
def test_bad_concepts_metadata(tmp_path, sd1, concepts, phrases):
    path = write_public(tmp_path / "concepts.safetensors", sd1, {"concepts": concepts, "rank": "1"})
    expect_file_error(path, *phrases)


def test_control_character_in_public_prompts(tmp_path, sd1):
    path = write_public(tmp_path / "ctl.safetensors", sd1, {"prompts": "snoopy,mick\x1bey", "rank": "1"})
    expect_file_error(path, "control characters")


@pytest.mark.parametrize("concepts, prompts", [('["snoopy"]', "mickey"), ("[]", "snoopy")])
def test_prompts_contradict_concepts(tmp_path, sd1, concepts, prompts):
    metadata = {"concepts": concepts, "prompts": prompts, "rank": "1"}
    expect_file_error(write_public(tmp_path / "contra.safetensors", sd1, metadata), "'prompts'", "contradicts")


def test_too_many_concepts(tmp_path, sd1):
    targets = [f"concept {i}" for i in range(MAX_CONCEPTS + 1)]
    path = write_public(tmp_path / "many.safetensors", sd1, {"concepts": json.dumps(targets), "rank": "1"})
    expect_file_error(path, f"{MAX_CONCEPTS + 1} concepts", f"at most {MAX_CONCEPTS}")
    prompts = write_public(tmp_path / "many_prompts.safetensors", sd1, {"prompts": ",".join(targets), "rank": "1"})
    expect_file_error(prompts, f"at most {MAX_CONCEPTS}")


def test_max_concepts_is_accepted(tmp_path, sd1):
    targets = [f"concept {i}" for i in range(MAX_CONCEPTS)]
    path = write_public(tmp_path / "enough.safetensors", sd1, {"concepts": json.dumps(targets), "rank": "1"})
    assert [c.target for c in load_membrane(path).concepts] == targets


def test_architecture_metadata_contradicts_shapes(tmp_path, sd1):
    path = write_public(tmp_path / "arch.safetensors", sd1, {**PUBLIC_METADATA, "architecture": "sdxl"})
    expect_file_error(path, "architecture sdxl", "sd1")


def test_unknown_architecture_value(tmp_path, sd1):
    path = write_public(tmp_path / "arch3.safetensors", sd1, {**PUBLIC_METADATA, "architecture": "sd3"})
    expect_file_error(path, "'architecture'", "sd3", "expected one of")


@pytest.mark.parametrize("key", ["base_model", "training"])
def test_invalid_json_in_base_model_or_training(tmp_path, sd1, key):
    path = write_public(tmp_path / "json.safetensors", sd1, {**PUBLIC_METADATA, key: "{name: tiny}"})
    expect_file_error(path, f"'{key}'", "not valid JSON")
