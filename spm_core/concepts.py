"""What a membrane erases: its concepts, cleaned and checked the same way wherever they come from."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

from .errors import SPMError

MAX_CONCEPTS = 64
MAX_PROMPT_CHARS = 1000


@dataclass(frozen=True)
class Concept:
    """One erased concept. `surrogate` is what an edit membrane turns it into; `neutral` the
    prompt the erase target is built from during training; `aliases` other prompts that also
    open the membrane at inference."""

    target: str
    surrogate: str | None = None
    neutral: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def prompts(self) -> tuple[str, ...]:
        """Every prompt that should open the membrane."""
        return (self.target, *self.aliases)

    def to_json(self) -> dict:
        out: dict = {"target": self.target}
        if self.surrogate is not None:
            out["surrogate"] = self.surrogate
        if self.neutral is not None:
            out["neutral"] = self.neutral
        if self.aliases:
            out["aliases"] = list(self.aliases)
        return out


def clean_prompt(text: object, what: str) -> str:
    """NFC-normalised, stripped prompt text; refuses non-strings, control characters, empties."""
    if not isinstance(text, str):
        raise SPMError(f"{what} must be text, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text).strip()
    if not text:
        raise SPMError(f"{what} is empty")
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise SPMError(f"{what} {text!r} contains control characters")
    hidden = sorted({f"U+{ord(ch):04X}" for ch in text if unicodedata.category(ch) == "Cf"})
    if hidden:  # zero-width and direction-changing characters: the name would show invisibly or reversed
        raise SPMError(f"{what} {text!r} contains invisible or text-direction characters ({', '.join(hidden)}); remove them")
    if len(text) > MAX_PROMPT_CHARS:
        raise SPMError(f"{what} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are allowed")
    return text


def concept_from_json(entry: object) -> Concept:
    """A Concept from its JSON form: a plain string (target only) or an object."""
    if isinstance(entry, str):
        return Concept(clean_prompt(entry, "concept target"))
    if not isinstance(entry, dict) or "target" not in entry:
        raise SPMError(f"concept entry {entry!r} must be a string or an object with a 'target'")
    unknown = set(entry) - {"target", "surrogate", "neutral", "aliases"}
    if unknown:
        raise SPMError(f"concept entry has unknown fields {sorted(unknown)}")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list):
        raise SPMError("concept 'aliases' must be a list of prompts")
    optional = {k: clean_prompt(entry[k], f"concept {k}") if entry.get(k) is not None else None
                for k in ("surrogate", "neutral")}
    return Concept(
        target=clean_prompt(entry["target"], "concept target"),
        aliases=tuple(clean_prompt(a, "concept alias") for a in aliases),
        **optional,
    )


def check_concept_count(concepts: tuple[Concept, ...]) -> tuple[Concept, ...]:
    if len(concepts) > MAX_CONCEPTS:
        raise SPMError(f"{len(concepts)} concepts in one membrane; at most {MAX_CONCEPTS} are supported")
    return concepts


def parse_concept_list(text: str) -> tuple[Concept, ...]:
    """Concepts from the comma-separated `prompts` metadata of the public SPM files."""
    targets = [part.strip() for part in text.split(",")]
    return check_concept_count(tuple(Concept(clean_prompt(t, "concept target")) for t in targets if t))
