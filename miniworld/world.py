"""The miniature world: single-object 16x16 pictures drawn by code, and captions from a small grammar.

A scene is one object (a plain shape or a composite "character") on a dark background. Shapes take
one of five colours; characters have their own fixed colours; anything can be striped (the
style-like attribute). Every concept has a canonical name and synonyms; all of them occur in the
captions the miniature model is trained on, so that a membrane trained on the canonical name can
later be probed with the synonyms (paraphrase) it never saw.

Pictures are drawn at 4x resolution and box-filtered down, so edges are anti-aliased. Values are
RGB in [0, 1], channels first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 16
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Concept:
    name: str
    family: str
    synonyms: tuple[str, ...]  # used in training captions, canonical name first


SHAPES = (
    Concept("circle", "shape", ("circle", "disc", "ball")),
    Concept("square", "shape", ("square", "box", "block")),
    Concept("triangle", "shape", ("triangle", "pyramid", "wedge")),
    Concept("cross", "shape", ("cross", "plus sign", "plus")),
)
CHARACTERS = (
    Concept("snowman", "character", ("snowman", "snow man", "frosty")),
    Concept("house", "character", ("house", "cottage", "hut")),
    Concept("tree", "character", ("tree", "oak", "bush")),
    Concept("mushroom", "character", ("mushroom", "toadstool", "fungus")),
)
COLOURS = (
    Concept("red", "colour", ("red", "crimson", "scarlet")),
    Concept("green", "colour", ("green", "emerald", "lime")),
    Concept("blue", "colour", ("blue", "azure", "cobalt")),
    Concept("yellow", "colour", ("yellow", "golden", "lemon")),
    Concept("purple", "colour", ("purple", "violet", "lilac")),
)
STYLES = (Concept("striped", "style", ("striped", "stripy", "zebra striped")),)

OBJECTS = SHAPES + CHARACTERS
CONCEPTS = OBJECTS + COLOURS + STYLES
OBJECT_NAMES = tuple(c.name for c in OBJECTS)
COLOUR_NAMES = tuple(c.name for c in COLOURS)
FAMILIES = ("shape", "character", "colour", "style")

RGB = {
    "red": (0.86, 0.16, 0.14), "green": (0.18, 0.72, 0.22), "blue": (0.16, 0.34, 0.92),
    "yellow": (0.95, 0.85, 0.15), "purple": (0.62, 0.18, 0.80),
    "white": (0.94, 0.94, 0.94), "orange": (1.0, 0.55, 0.1), "brown": (0.50, 0.30, 0.12),
    "tan": (0.85, 0.70, 0.48), "roof": (0.55, 0.10, 0.10), "leaf": (0.10, 0.50, 0.16), "dark": (0.1, 0.08, 0.06),
}
STRIPE_DARKEN = 0.35


def concept(name: str) -> Concept:
    for c in CONCEPTS:
        if c.name == name:
            return c
    raise KeyError(f"no concept {name!r} in the miniature world; known: {', '.join(c.name for c in CONCEPTS)}")


@dataclass(frozen=True)
class Scene:
    """What a picture shows. `colour` is None for characters (they have their own colours)."""

    obj: str
    colour: str | None
    striped: bool

    @property
    def concepts(self) -> tuple[str, ...]:
        return (self.obj,) + ((self.colour,) if self.colour else ()) + (("striped",) if self.striped else ())


def random_scene(rng: np.random.Generator, striped_share: float = 0.25) -> Scene:
    obj = OBJECT_NAMES[rng.integers(len(OBJECT_NAMES))]
    colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))] if obj in {c.name for c in SHAPES} else None
    return Scene(obj, colour, bool(rng.random() < striped_share))


# ---- drawing ---------------------------------------------------------------------------------

def _grid() -> tuple[np.ndarray, np.ndarray]:
    n = SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # in output-pixel units
    return np.meshgrid(coords, coords, indexing="xy")


_X, _Y = _grid()


def _disc(cx, cy, r):
    return (_X - cx) ** 2 + (_Y - cy) ** 2 <= r * r


def _rect(x0, y0, x1, y1):
    return (_X >= x0) & (_X <= x1) & (_Y >= y0) & (_Y <= y1)


def _triangle(cx, top, half_width, bottom):
    """Upward triangle: apex at (cx, top), base from cx - half_width to cx + half_width at `bottom`."""
    depth = (_Y - top) / max(bottom - top, 1e-6)
    return (_Y <= bottom) & (depth >= 0) & (np.abs(_X - cx) <= depth * half_width)


def _layers(scene: Scene, cx: float, cy: float, r: float, c) -> list[tuple[np.ndarray, tuple[float, float, float]]]:
    """(mask, colour) pairs, painted in order; `c` is the shape's colour."""
    if scene.obj == "circle":
        return [(_disc(cx, cy, r), c)]
    if scene.obj == "square":
        s = r * 0.85
        return [(_rect(cx - s, cy - s, cx + s, cy + s), c)]
    if scene.obj == "triangle":
        return [(_triangle(cx, cy - r, r * 1.05, cy + r * 0.85), c)]
    if scene.obj == "cross":
        t = r * 0.36
        return [(_rect(cx - t, cy - r, cx + t, cy + r) | _rect(cx - r, cy - t, cx + r, cy + t), c)]
    if scene.obj == "snowman":
        return [(_disc(cx, cy + r * 0.45, r * 0.62), RGB["white"]),
                (_disc(cx, cy - r * 0.5, r * 0.42), RGB["white"]),
                (_rect(cx - 0.1, cy - r * 0.55, cx + r * 0.45, cy - r * 0.35), RGB["orange"])]
    if scene.obj == "house":
        return [(_rect(cx - r * 0.75, cy - r * 0.1, cx + r * 0.75, cy + r), RGB["tan"]),
                (_triangle(cx, cy - r, r * 1.0, cy - r * 0.1), RGB["roof"]),
                (_rect(cx - r * 0.2, cy + r * 0.4, cx + r * 0.2, cy + r), RGB["dark"])]
    if scene.obj == "tree":
        return [(_rect(cx - r * 0.2, cy + r * 0.2, cx + r * 0.2, cy + r), RGB["brown"]),
                (_disc(cx, cy - r * 0.25, r * 0.7), RGB["leaf"])]
    if scene.obj == "mushroom":
        cap = _disc(cx, cy, r) & (_Y <= cy)
        spots = _disc(cx - r * 0.45, cy - r * 0.45, r * 0.2) | _disc(cx + r * 0.35, cy - r * 0.55, r * 0.18)
        return [(_rect(cx - r * 0.28, cy, cx + r * 0.28, cy + r * 0.9), RGB["white"]),
                (cap, RGB["red"]), (cap & spots, RGB["white"])]
    raise KeyError(scene.obj)


def render(scene: Scene, rng: np.random.Generator, shape_rgb: tuple[float, float, float] | None = None) -> np.ndarray:
    """One picture of `scene`, (3, 16, 16) in [0, 1], with random placement, size, tints.
    `shape_rgb` paints a shape in a colour off the palette instead of its own."""
    n = SIZE * SUPERSAMPLE
    background = rng.uniform(0.04, 0.24, size=3)
    canvas = np.broadcast_to(background[:, None, None], (3, n, n)).copy()
    r = rng.uniform(4.6, 6.2)
    cx, cy = SIZE / 2 + rng.uniform(-1.6, 1.6), SIZE / 2 + rng.uniform(-1.6, 1.6)
    jitter = rng.uniform(-0.06, 0.06, size=3)
    stripes = (np.floor((_Y - cy) / 2.0) % 2 == 1) if scene.striped else None
    own = RGB[scene.colour] if scene.colour else None
    for mask, colour in _layers(scene, cx, cy, r, shape_rgb or own):
        rgb = np.clip(np.asarray(colour) + jitter, 0, 1)
        for ch in range(3):
            value = np.full((n, n), rgb[ch])
            if stripes is not None:
                value = np.where(stripes, value * STRIPE_DARKEN, value)
            canvas[ch][mask] = value[mask]
    return canvas.reshape(3, SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(2, 4)).astype(np.float32)


def render_empty(rng: np.random.Generator) -> np.ndarray:
    """A background with no object: the classifier's "none" examples."""
    return np.broadcast_to(rng.uniform(0.04, 0.24, size=3)[:, None, None], (3, SIZE, SIZE)).astype(np.float32).copy()


# ---- captions --------------------------------------------------------------------------------

TEMPLATES = ("a {p}", "{p}", "a drawing of a {p}", "a {p} on a dark background", "a picture of a {p}")
STRIPED_ADJECTIVES = ("striped", "stripy", "zebra striped")
STRIPED_SUFFIXES = (" with stripes", " with a striped pattern")


def _article(text: str) -> str:
    return "an " + text[2:] if text.startswith("a ") and text[2:3] in "aeiou" else text


def caption(scene: Scene, rng: np.random.Generator, colour_share: float = 0.85) -> str:
    """A caption for `scene`: a random synonym for each concept, adjectives in random order, a
    random template. Shapes name their colour in `colour_share` of captions (otherwise the colour
    is left open); stripes are an adjective or a suffix."""
    def pick(options):
        return options[rng.integers(len(options))]

    adjectives, suffix = [], ""
    if scene.striped:
        if rng.random() < 0.4:
            suffix += pick(STRIPED_SUFFIXES)
        else:
            adjectives.append(pick(STRIPED_ADJECTIVES))
    if scene.colour is not None and rng.random() < colour_share:
        colour = pick(concept(scene.colour).synonyms)
        if rng.random() < 0.2:
            suffix = f" in {colour}" + suffix
        else:
            adjectives.append(colour)
    adjectives = [adjectives[i] for i in rng.permutation(len(adjectives))]
    phrase = " ".join(adjectives + [pick(concept(scene.obj).synonyms)]) + suffix
    return _article(pick(TEMPLATES).format(p=phrase))


def canonical_prompt(obj: str, colour: str | None = None, striped: bool = False) -> str:
    """The plain phrasing used for evaluation prompts: "a red circle", "a striped snowman"."""
    words = (["striped"] if striped else []) + ([colour] if colour else []) + [obj]
    return _article("a " + " ".join(words))


# ---- evaluation prompts ----------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """An evaluation prompt and the concepts it asks for."""

    text: str
    concepts: tuple[str, ...]


def evaluation_prompts() -> list[Request]:
    """Every shape in every colour, every character, and one striped version of each object, in
    the plain phrasing ("a red circle", "a snowman", "a striped blue triangle")."""
    requests = [Request(canonical_prompt(s.name, c.name), (s.name, c.name)) for s in SHAPES for c in COLOURS]
    requests += [Request(canonical_prompt(c.name), (c.name,)) for c in CHARACTERS]
    for index, obj in enumerate(OBJECTS):
        colour = COLOURS[index % len(COLOURS)].name if obj in SHAPES else None
        requests.append(Request(canonical_prompt(obj.name, colour, striped=True),
                                (obj.name,) + ((colour,) if colour else ()) + ("striped",)))
    return requests
