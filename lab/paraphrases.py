"""Prompts that ask for a concept in words its membrane never saw: the paraphrase attack.

A membrane is trained on the concept's canonical name only ("snowman"). The miniature model was
trained on every synonym ("snow man", "frosty"), so a synonym asks it for the same picture while
the text gate sees different tokens. Misspellings and reordered words are tried too; the model
never saw those, so they attack the gate only where the bare model still draws the concept (the
benchmark reports the bare model's recall beside every attack).
"""

from __future__ import annotations

import re

from miniworld.world import Request, concept


def with_word(request: Request, name: str, word: str) -> Request:
    """The request with the whole word `name` replaced by `word` (it still asks for the same concepts)."""
    text = re.sub(rf"\b{re.escape(name)}\b", word, request.text)
    return Request(re.sub(r"\ba (?=[aeiou])", "an ", text), request.concepts)


def misspelled(word: str) -> str:
    """The two letters in the middle of the word swapped (circle -> cirlce, red -> erd), or the
    middle letter left out where both are the same (yellow -> yelow)."""
    middle = max(1, len(word) // 2)
    if word[middle - 1] == word[middle]:
        return word[:middle] + word[middle + 1:]
    return word[: middle - 1] + word[middle] + word[middle - 1] + word[middle + 1:]


def reordered(text: str) -> str:
    """The article dropped and the words reversed: "a red circle" -> "circle red"."""
    words = text.split()
    if words[0] in ("a", "an"):
        words = words[1:]
    return " ".join(reversed(words))


def paraphrases(name: str, targets: list[Request]) -> list[Request]:
    """For the concept `name`, from prompts naming it: each unseen synonym in the first prompt, a
    misspelling in it and the second prompt reordered."""
    synonyms = concept(name).synonyms[1:]
    first, second = targets[0], targets[min(1, len(targets) - 1)]
    attacks = [with_word(first, name, s) for s in synonyms]
    attacks.append(with_word(first, name, misspelled(name)))
    attacks.append(Request(reordered(second.text), second.concepts))
    unique: dict[str, Request] = {}
    for attack in attacks:
        unique.setdefault(attack.text, attack)
    return list(unique.values())
