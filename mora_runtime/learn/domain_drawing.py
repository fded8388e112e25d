"""The drawn image domains (domains.py): what each class of them is, and how one image of it
is drawn.

Every drawer is `draw_<kind>(class index, rng, size) -> RGB image`, deterministic in the
generator's state. Images are drawn at `SUPERSAMPLE` times the size and box-downsampled (so
edges are anti-aliased), then get pixel noise. The class vocabularies live here because a
class index means what its drawer draws; domains.py names the domains and their prompts over
them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SUPERSAMPLE = 4

# name -> RGB; the base domain's colours.
OBJECT_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "white": (235, 235, 235),
    "purple": (150, 60, 200),
}
OBJECTS = ("block", "ring", "frame", "bar")
SHAPES = ("circle", "triangle", "star", "hexagon", "cross", "crescent")
LETTERS = ("B", "E", "G", "K", "R", "S")
TEXTURES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "polka dots",
    "static noise",
)
PATCH_COLOURS = {
    "crimson": (165, 20, 50),
    "emerald": (20, 150, 90),
    "navy": (20, 30, 110),
    "amber": (245, 165, 10),
    "violet": (130, 80, 230),
    "teal": (20, 140, 140),
}

# Kinds of the "sketches" background domain (no word of the base labels, no continual class).
SKETCHES = (
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


def _finish(canvas: Image.Image, size: int, rng, noise: float) -> Image.Image:
    """Box-downsample the supersampled canvas to `size` and add Gaussian pixel noise."""
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


def draw_object(cls: int, rng, size: int) -> Image.Image:
    colour_name = tuple(OBJECT_COLOURS)[cls // len(OBJECTS)]
    kind = OBJECTS[cls % len(OBJECTS)]
    side = size * SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(0, 60, 3))
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    fill = _jitter(OBJECT_COLOURS[colour_name], rng, 25)
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


def draw_shape(cls: int, rng, size: int) -> Image.Image:
    side = size * SUPERSAMPLE
    fg, bg = _contrasting_pair(rng)
    canvas = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = _placement(rng, side, 0.5, 0.9)
    angle = rng.uniform(0, 2 * math.pi)
    shape = SHAPES[cls]
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


def draw_glyph(cls: int, rng, size: int) -> Image.Image:
    side = size * SUPERSAMPLE
    fg, bg = _contrasting_pair(rng)
    canvas = Image.new("RGB", (side, side), bg)
    mask = _glyph_mask(LETTERS[cls], int(side * rng.uniform(0.45, 0.8)))
    mask = mask.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR, expand=True)
    if max(mask.size) > side:
        scale = side / max(mask.size)
        mask = mask.resize((int(mask.width * scale), int(mask.height * scale)))
    x = int(rng.integers(0, side - mask.width + 1))
    y = int(rng.integers(0, side - mask.height + 1))
    canvas.paste(Image.new("RGB", mask.size, fg), (x, y), mask)
    return _finish(canvas, size, rng, noise=6.0)


def draw_texture(cls: int, rng, size: int) -> Image.Image:
    side = size * SUPERSAMPLE
    fg, bg = _contrasting_pair(rng)
    texture = TEXTURES[cls]
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


def draw_patch(cls: int, rng, size: int) -> Image.Image:
    base = np.asarray(_jitter(tuple(PATCH_COLOURS.values())[cls], rng, 20), np.float32)
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


def draw_sketch(cls: int, rng, size: int) -> Image.Image:
    """One stroke primitive at a random position, scale, rotation and stroke width."""
    side = size * SUPERSAMPLE
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

    kind = SKETCHES[cls]
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
