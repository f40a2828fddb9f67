"""The miniature world's classifier: which object, which colour, striped or not, in a 16x16 picture,
and whether it is a picture at all.

Four heads on one small CNN:
  object  the 8 objects or "none" (no clear object: an empty or smudged background);
  colour  the 5 shape colours or "other" (any colour off the palette); characters carry no label;
  striped yes / no;
  clean   yes / no: a picture of this world (with the mild flaws of a generation) against garbage
          (noise, heavy speckle, bands across the whole picture, two pictures blended, smeared
          mush). The other heads have no answer for garbage: they read uniform noise as some
          object, so a membrane that turns its concept into noise would otherwise count as erasing it.
It is trained only on procedural renders and procedural garbage (never on the model's
generations); the renders are made harder with noise, tints, blur and smooth smudges so that it
reads generated pictures too. A concept counts as "found" in a picture when its head gives it
probability >= FOUND (0.5); a picture is clean when the clean head gives >= FOUND.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import world

OBJECT_CLASSES = world.OBJECT_NAMES + ("none",)
COLOUR_CLASSES = world.COLOUR_NAMES + ("other",)
FOUND = 0.5
IGNORE = -100


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        def block(cin, cout, stride):
            return [torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU()]
        self.features = torch.nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2),
                                            *block(128, 128, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.object_head = torch.nn.Linear(128, len(OBJECT_CLASSES))
        self.colour_head = torch.nn.Linear(128, len(COLOUR_CLASSES))
        self.striped_head = torch.nn.Linear(128, 1)
        self.clean_head = torch.nn.Linear(128, 1)

    def forward(self, pictures: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits for (object, colour, striped, clean) from (B, 3, 16, 16) RGB in [0, 1]."""
        features = self.features(pictures * 2 - 1)
        return (self.object_head(features), self.colour_head(features), self.striped_head(features)[:, 0],
                self.clean_head(features)[:, 0])


@dataclass(frozen=True)
class Verdict:
    """The classifier's reading of one picture."""

    object_probs: dict[str, float]
    colour_probs: dict[str, float]
    striped_prob: float
    clean_prob: float = 1.0  # a verdict made without the clean head takes the picture as clean

    @property
    def is_clean(self) -> bool:
        """A picture of this world, not noise, speckle, bands, a blend or mush."""
        return self.clean_prob >= FOUND

    @property
    def obj(self) -> str:
        return max(self.object_probs, key=self.object_probs.get)

    @property
    def colour(self) -> str:
        return max(self.colour_probs, key=self.colour_probs.get)

    def probability(self, concept: str) -> float:
        """How sure the classifier is that `concept` is in the picture."""
        if concept in self.object_probs:
            return self.object_probs[concept]
        if concept in self.colour_probs:
            return self.colour_probs[concept]
        if concept == "striped":
            return self.striped_prob
        raise KeyError(concept)

    def finds(self, concept: str) -> bool:
        return self.probability(concept) >= FOUND

    def label(self) -> str:
        """Short text for a grid caption, e.g. "red circle", "striped tree", "none"."""
        if self.obj == "none":
            return "none"
        words = ["striped"] if self.striped_prob >= FOUND else []
        if self.obj in {c.name for c in world.SHAPES}:
            words.append(self.colour)
        return " ".join(words + [self.obj])


@torch.no_grad()
def classify(classifier: Classifier, pictures: torch.Tensor) -> list[Verdict]:
    object_logits, colour_logits, striped_logits, clean_logits = classifier(pictures.float())
    objects, colours = object_logits.softmax(-1), colour_logits.softmax(-1)
    striped, clean = striped_logits.sigmoid(), clean_logits.sigmoid()
    return [Verdict(dict(zip(OBJECT_CLASSES, objects[i].tolist())), dict(zip(COLOUR_CLASSES, colours[i].tolist())),
                    float(striped[i]), float(clean[i])) for i in range(len(pictures))]


def load_classifier(path: str) -> Classifier:
    import safetensors.torch

    classifier = Classifier()
    classifier.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(path).items()})
    return classifier.eval()


# ---- training data ---------------------------------------------------------------------------

def _off_palette_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    palette = np.array([world.RGB[c] for c in world.COLOUR_NAMES])
    while True:
        colour = rng.uniform(0, 1, size=3)
        if np.min(np.linalg.norm(palette - colour, axis=1)) > 0.35:
            return tuple(colour)


def _smooth_field(rng: np.random.Generator, scale: float) -> np.ndarray:
    coarse = torch.from_numpy(rng.normal(0, scale, size=(1, 3, 4, 4)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=(world.SIZE, world.SIZE), mode="bilinear").numpy()[0]


def _degrade(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise, tint, blur and smudges: the ways a generated picture differs from a clean render."""
    picture = picture * rng.uniform(0.85, 1.15, size=(3, 1, 1)) + rng.uniform(-0.06, 0.06, size=(3, 1, 1))
    if rng.random() < 0.3:
        blurred = torch.nn.functional.avg_pool2d(torch.from_numpy(picture[None].astype(np.float32)), 3, 1, 1,
                                                 count_include_pad=False).numpy()[0]
        picture = picture + rng.uniform(0.3, 0.8) * (blurred - picture)
    picture = picture + _smooth_field(rng, rng.uniform(0, 0.06)) + rng.normal(0, rng.uniform(0, 0.08), size=picture.shape)
    return np.clip(picture, 0, 1).astype(np.float32)


def labelled_render(rng: np.random.Generator) -> tuple[np.ndarray, int, int, int]:
    """A degraded render: (picture, object label, colour label, striped label) with IGNORE where a
    head has no label."""
    roll = rng.random()
    if roll < 0.1:
        return _degrade(world.render_empty(rng), rng), OBJECT_CLASSES.index("none"), IGNORE, IGNORE
    scene = world.random_scene(rng)
    if roll < 0.2 and scene.colour is not None:
        picture = world.render(scene, rng, shape_rgb=_off_palette_colour(rng))
        colour_label = COLOUR_CLASSES.index("other")
    else:
        picture = world.render(scene, rng)
        colour_label = COLOUR_CLASSES.index(scene.colour) if scene.colour else IGNORE
    return _degrade(picture, rng), OBJECT_CLASSES.index(scene.obj), colour_label, int(scene.striped)


# ---- garbage: what is not a clean picture --------------------------------------------------------
# Each kind stays well clear of the renders' own mild flaws (pixel noise up to std 0.08, smudges up
# to 0.06, a partial 3x3 blur), so that the margin between clean and garbage is not learnt from
# borderline cases on either side.

GARBAGE_KINDS = ("uniform noise", "gaussian noise", "speckle", "bands", "blend", "mush")
GARBAGE_SHARE = 0.25  # of training examples


def _object_render(rng: np.random.Generator, other_than: str | None = None) -> tuple[np.ndarray, str]:
    while True:
        scene = world.random_scene(rng)
        if scene.obj != other_than:
            return _degrade(world.render(scene, rng), rng), scene.obj


def _gaussian_blur(picture: np.ndarray, sigma: float) -> np.ndarray:
    offsets = np.arange(-5, 6)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = torch.from_numpy((kernel / kernel.sum()).astype(np.float32))
    padded = torch.nn.functional.pad(torch.from_numpy(picture[:, None].astype(np.float32)), (5, 5, 5, 5), mode="replicate")
    rows = torch.nn.functional.conv2d(padded, kernel.reshape(1, 1, 1, -1))
    return torch.nn.functional.conv2d(rows, kernel.reshape(1, 1, -1, 1))[:, 0].numpy()


def _coarse_colours(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """A smooth field of random colours, from a 2x2 to 6x6 grid of them."""
    grid = int(rng.integers(2, 7))
    coarse = torch.from_numpy(rng.uniform(low, high, size=(1, 3, grid, grid)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=(world.SIZE, world.SIZE), mode="bilinear",
                                           align_corners=True).numpy()[0]


def garbage(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One picture of `kind` (one of GARBAGE_KINDS) that is not a clean picture of this world,
    (3, 16, 16) in [0, 1]."""
    shape = (3, world.SIZE, world.SIZE)
    if kind == "uniform noise":
        low = rng.uniform(0, 0.4, size=(3, 1, 1))
        picture = rng.uniform(low, rng.uniform(low + 0.4, 1.0), size=shape)
    elif kind == "gaussian noise":
        picture = rng.normal(rng.uniform(0.1, 0.7, size=(3, 1, 1)), rng.uniform(0.15, 0.4), size=shape)
    elif kind == "speckle":
        picture, _ = _object_render(rng)
        if rng.random() < 0.5:
            picture = picture + rng.normal(0, rng.uniform(0.2, 0.45), size=shape)
        else:
            hit = rng.random((1, world.SIZE, world.SIZE)) < rng.uniform(0.25, 0.6)
            picture = np.where(hit, rng.uniform(0, 1, size=shape), picture)
    elif kind == "bands":
        y, x = np.mgrid[0:world.SIZE, 0:world.SIZE]
        angle = rng.uniform(0, np.pi)
        width = rng.uniform(1.0, 3.0)
        band = np.floor((x * np.cos(angle) + y * np.sin(angle) + rng.uniform(0, 2 * width)) / width) % 2 == 1
        first, second = rng.uniform(0, 1, size=(2, 3, 1, 1))
        second = np.where(np.abs(first - second).max() < 0.3, 1 - first, second)
        alpha = rng.uniform(0.5, 1.0)
        picture = alpha * np.where(band, first, second) + (1 - alpha) * _object_render(rng)[0]
    elif kind == "blend":
        first, obj = _object_render(rng)
        alpha = rng.uniform(0.35, 0.65)
        picture = alpha * first + (1 - alpha) * _object_render(rng, other_than=obj)[0]
    elif kind == "mush":
        if rng.random() < 0.5:
            picture = _coarse_colours(rng, 0.0, 1.0)
        else:
            smeared = _gaussian_blur(_object_render(rng)[0], rng.uniform(1.8, 3.0))
            picture = smeared + _coarse_colours(rng, -1.0, 1.0) * rng.uniform(0.1, 0.25)
    else:
        raise KeyError(kind)
    return np.clip(picture, 0, 1).astype(np.float32)


def labelled_example(rng: np.random.Generator) -> tuple[np.ndarray, int, int, int, int]:
    """(picture, object label, colour label, striped label, clean label): a degraded render (clean)
    or, GARBAGE_SHARE of the time, garbage of a random kind (no label but clean = 0)."""
    if rng.random() < GARBAGE_SHARE:
        return garbage(GARBAGE_KINDS[rng.integers(len(GARBAGE_KINDS))], rng), IGNORE, IGNORE, IGNORE, 0
    return (*labelled_render(rng), 1)


def labelled_batch(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, ...]:
    """(pictures, object, colour, striped, clean labels) for `size` examples."""
    examples = [labelled_example(rng) for _ in range(size)]
    pictures = torch.from_numpy(np.stack([e[0] for e in examples]))
    return (pictures,) + tuple(torch.tensor([e[i] for e in examples]) for i in (1, 2, 3, 4))


def garbage_batch(rng: np.random.Generator, kind: str, size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([garbage(kind, rng) for _ in range(size)]))
