"""Synthetic captioned scenes: the demo's data set, made on a CPU in seconds.

Each image holds one to three kinds of object (a dog, two red cars, ...) drawn with PIL
primitives on one of several scenes (beach, snow, road, ...), some outdoor scenes at
night. Every caption names every object drawn, and often its count, colour, size and
position and the scene, so text carries enough signal to train a small model from scratch.

Layout written by :func:`generate`::

    DIR/images/{train,val,test}/00000.png
    DIR/{train,val,test}.jsonl     pair files (see vkd.data.pairs), image paths relative to DIR
    DIR/synth.json                 seed, counts, held-out combinations, vocabulary, per-image truth

A share of the (object, scene) combinations appears only in the test split, so test
recall measures generalisation to unseen compositions rather than memory; val follows
the train distribution so hyper-parameters are picked without looking at those.
Everything depends on the seed alone: the same seed writes byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from vkd.data.images import load_image

__all__ = [
    "COLOURS",
    "DOMAINS",
    "OBJECTS",
    "SCENES",
    "SPLITS",
    "SynthSummary",
    "choose_heldout",
    "choose_target_only",
    "generate",
    "preview_grid",
    "split_counts",
    "vocabulary",
]

RGB = tuple[int, int, int]
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1

# Share of (object, scene) pairs kept out of train and val.
HELDOUT_FRACTION = 0.12
# Share of test images (beyond the ones that guarantee coverage) built around a held-out pair,
# so that the held-out subset of test is big enough to measure.
TEST_HELDOUT_SHARE = 0.3
NIGHT_PROBABILITY = 0.2

# Domains, mirroring web-scale pre-training data against a target set such as Flickr30k:
# "general" is the pre-training set (terse alt-text wording, the common name of each object,
# never a target-only object-scene pair); "target" is the domain users fine-tune on
# (descriptive wording: positions, relations, verbs, synonyms such as "puppy" or "cottage",
# and a share of images built around target-only pairs). "mixed" is both at once, the
# original single-domain data set.
DOMAINS = ("mixed", "general", "target")
# Share of (object, scene) pairs that only the target domain shows.
TARGET_ONLY_FRACTION = 0.25
# Share of target images built around a target-only pair, so that the domain gap is felt.
TARGET_ONLY_SHARE = 0.3
# Share of target captions in the target's own wording (the rest read like general ones).
TARGET_WORDING_SHARE = 0.5
# Share of general captions that use a rarer word (a synonym, another scene phrase): web data
# has every word, just rarely; the target's layout templates stay target-only.
GENERAL_RARE_WORD_SHARE = 0.1
MIN_SIZE, MAX_SIZE = 16, 1024

COLOURS: dict[str, RGB] = {
    "red": (205, 35, 35),
    "blue": (40, 85, 210),
    "green": (45, 160, 55),
    "yellow": (245, 215, 40),
    "white": (246, 246, 246),
    "black": (28, 28, 28),
    "brown": (135, 82, 40),
    "orange": (245, 135, 20),
    "pink": (245, 140, 190),
    "purple": (135, 55, 180),
    "grey": (130, 130, 130),
}

OUTLINE: RGB = (24, 24, 24)
GLASS: RGB = (170, 215, 245)
WOOD: RGB = (110, 70, 35)


# ---------------------------------------------------------------- drawing objects


class Pen:
    """Draws in an object's own frame: x to its front, y up from the ground, in units of its height.

    Objects are designed once facing right; ``flip`` mirrors them, and the outline width
    scales with the object so silhouettes stay separated from the background at any size.
    """

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, base: float, height: float,
                 flip: int, line: int) -> None:
        self.draw, self.cx, self.base, self.h, self.flip, self.line = draw, cx, base, height, flip, line

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + self.flip * x * self.h, self.base - y * self.h)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        (a, b), (c, d) = self.p(x0, y0), self.p(x1, y1)
        return [min(a, c), min(b, d), max(a, c), max(b, d)]

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, fill: RGB, outline: bool = True) -> None:
        self.draw.ellipse(self.box(x0, y0, x1, y1), fill=fill,
                          outline=OUTLINE if outline else None, width=self.line if outline else 0)

    def circle(self, x: float, y: float, r: float, fill: RGB, outline: bool = True) -> None:
        self.ellipse(x - r, y - r, x + r, y + r, fill, outline)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: RGB, outline: bool = True) -> None:
        self.draw.rectangle(self.box(x0, y0, x1, y1), fill=fill,
                            outline=OUTLINE if outline else None, width=self.line if outline else 0)

    def rounded(self, x0: float, y0: float, x1: float, y1: float, r: float, fill: RGB) -> None:
        self.draw.rounded_rectangle(self.box(x0, y0, x1, y1), radius=r * self.h, fill=fill,
                                    outline=OUTLINE, width=self.line)

    def poly(self, points: Sequence[tuple[float, float]], fill: RGB, outline: bool = True) -> None:
        self.draw.polygon([self.p(x, y) for x, y in points], fill=fill,
                          outline=OUTLINE if outline else None, width=self.line if outline else 0)

    def stroke(self, points: Sequence[tuple[float, float]], width: float, fill: RGB,
               outline: bool = True) -> None:
        pts = [self.p(x, y) for x, y in points]
        px = max(1, round(width * self.h))
        if outline:
            self.draw.line(pts, fill=OUTLINE, width=px + 2 * self.line, joint="curve")
        self.draw.line(pts, fill=fill, width=px, joint="curve")

    def blob(self, circles: Sequence[tuple[float, float, float]], fill: RGB) -> None:
        """Overlapping circles with one outline around their union (a tree crown, a cloud)."""
        grow = self.line / self.h
        for x, y, r in circles:
            self.circle(x, y, r + grow, OUTLINE, outline=False)
        for x, y, r in circles:
            self.circle(x, y, r, fill, outline=False)


def shade(colour: RGB, factor: float) -> RGB:
    return tuple(int(max(0, min(255, round(c * factor)))) for c in colour)  # type: ignore[return-value]


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _detail(colour: RGB) -> RGB:
    """A second tone of an object's colour for its parts (ears, wings): darker, or lighter for black."""
    return mix(colour, (255, 255, 255), 0.35) if sum(colour) < 150 else shade(colour, 0.7)


def _draw_dog(pen: Pen, c: RGB) -> None:
    pen.stroke([(-0.42, 0.52), (-0.56, 0.66), (-0.62, 0.84)], 0.08, c)
    for x in (-0.42, -0.28, 0.1, 0.24):
        pen.rect(x, 0.0, x + 0.1, 0.42, c)
    pen.ellipse(-0.5, 0.28, 0.36, 0.64, c)
    pen.ellipse(0.22, 0.52, 0.54, 0.88, c)
    pen.ellipse(0.42, 0.54, 0.72, 0.72, c)
    pen.circle(0.7, 0.68, 0.045, OUTLINE, outline=False)
    pen.ellipse(0.2, 0.48, 0.34, 0.84, _detail(c))
    pen.circle(0.44, 0.76, 0.035, OUTLINE, outline=False)


def _draw_cat(pen: Pen, c: RGB) -> None:
    pen.stroke([(0.12, 0.04), (0.4, 0.05), (0.5, 0.16), (0.48, 0.32)], 0.07, c)
    pen.ellipse(-0.27, 0.0, 0.27, 0.62, c)
    pen.poly([(-0.24, 0.72), (-0.22, 1.02), (-0.04, 0.86)], c)
    pen.poly([(0.24, 0.72), (0.22, 1.02), (0.04, 0.86)], c)
    pen.ellipse(-0.24, 0.5, 0.24, 0.9, c)
    eye = (120, 200, 60) if c != COLOURS["green"] else (240, 220, 60)
    for x in (-0.1, 0.1):
        pen.ellipse(x - 0.055, 0.67, x + 0.055, 0.77, eye, outline=False)
        pen.ellipse(x - 0.018, 0.675, x + 0.018, 0.765, OUTLINE, outline=False)
    pen.poly([(-0.035, 0.63), (0.035, 0.63), (0.0, 0.59)], (240, 130, 150), outline=False)
    for side in (-1, 1):
        pen.stroke([(side * 0.06, 0.6), (side * 0.3, 0.64)], 0.012, OUTLINE, outline=False)
        pen.stroke([(side * 0.06, 0.58), (side * 0.3, 0.56)], 0.012, OUTLINE, outline=False)
    pen.ellipse(-0.2, 0.0, -0.04, 0.09, c)
    pen.ellipse(0.04, 0.0, 0.2, 0.09, c)


def _draw_rabbit(pen: Pen, c: RGB) -> None:
    inner = (240, 150, 170)
    pen.ellipse(0.02, 0.5, 0.15, 1.0, c)
    pen.ellipse(0.06, 0.58, 0.11, 0.92, inner, outline=False)
    pen.circle(-0.44, 0.22, 0.1, mix(c, (255, 255, 255), 0.6))
    pen.ellipse(-0.46, 0.0, 0.16, 0.52, c)
    pen.ellipse(0.13, 0.5, 0.26, 0.98, c)
    pen.ellipse(0.17, 0.58, 0.22, 0.9, inner, outline=False)
    pen.ellipse(0.0, 0.34, 0.4, 0.66, c)
    pen.circle(0.26, 0.54, 0.035, OUTLINE, outline=False)
    pen.circle(0.39, 0.48, 0.03, inner, outline=False)
    pen.ellipse(-0.04, 0.0, 0.26, 0.09, c)


def _draw_bird(pen: Pen, c: RGB) -> None:
    beak = (250, 170, 20) if c not in (COLOURS["orange"], COLOURS["yellow"]) else (200, 90, 10)
    pen.stroke([(-0.05, 0.24), (-0.05, 0.0)], 0.03, (200, 120, 20), outline=False)
    pen.stroke([(0.08, 0.24), (0.08, 0.0)], 0.03, (200, 120, 20), outline=False)
    pen.poly([(-0.3, 0.4), (-0.72, 0.58), (-0.66, 0.3)], _detail(c))
    pen.ellipse(-0.42, 0.18, 0.28, 0.6, c)
    pen.poly([(0.3, 0.66), (0.62, 0.58), (0.3, 0.5)], beak)
    pen.circle(0.24, 0.62, 0.17, c)
    pen.circle(0.29, 0.66, 0.035, OUTLINE, outline=False)
    pen.poly([(-0.3, 0.46), (0.12, 0.48), (-0.2, 1.0)], _detail(c))


def _draw_fish(pen: Pen, c: RGB) -> None:
    fin = _detail(c)
    pen.poly([(-0.32, 0.5), (-0.72, 0.85), (-0.64, 0.5), (-0.72, 0.15)], fin)
    pen.poly([(-0.18, 0.72), (0.04, 0.95), (0.16, 0.72)], fin)
    pen.ellipse(-0.48, 0.18, 0.5, 0.82, c)
    pen.stroke([(0.14, 0.3), (0.2, 0.5), (0.14, 0.7)], 0.025, fin, outline=False)
    pen.circle(0.3, 0.58, 0.075, (250, 250, 250))
    pen.circle(0.32, 0.58, 0.035, OUTLINE, outline=False)
    pen.ellipse(-0.1, 0.22, 0.04, 0.78, mix(c, (255, 255, 255), 0.4), outline=False)


def _draw_car(pen: Pen, c: RGB) -> None:
    pen.poly([(-0.52, 0.52), (-0.32, 0.92), (0.3, 0.92), (0.56, 0.52)], c)
    pen.poly([(-0.42, 0.56), (-0.27, 0.84), (-0.04, 0.84), (-0.04, 0.56)], GLASS)
    pen.poly([(0.04, 0.56), (0.04, 0.84), (0.25, 0.84), (0.44, 0.56)], GLASS)
    pen.rounded(-0.98, 0.16, 0.98, 0.58, 0.1, c)
    pen.ellipse(0.84, 0.36, 0.97, 0.48, (255, 230, 120), outline=False)
    pen.rect(-0.97, 0.36, -0.9, 0.48, (200, 20, 20), outline=False)
    for x in (-0.55, 0.55):
        pen.circle(x, 0.19, 0.19, (35, 35, 35))
        pen.circle(x, 0.19, 0.08, (170, 170, 170), outline=False)


def _draw_boat(pen: Pen, c: RGB) -> None:
    sail = (252, 248, 232) if c != COLOURS["white"] else (235, 225, 190)
    pen.stroke([(0.0, 0.3), (0.0, 1.12)], 0.045, WOOD)
    pen.poly([(0.05, 1.08), (0.05, 0.38), (0.62, 0.38)], sail)
    pen.poly([(-0.05, 0.98), (-0.05, 0.38), (-0.46, 0.38)], shade(sail, 0.92))
    pen.poly([(0.0, 1.12), (0.18, 1.06), (0.0, 1.0)], (220, 40, 40), outline=False)
    pen.poly([(-0.82, 0.34), (0.88, 0.34), (0.6, 0.0), (-0.62, 0.0)], c)
    pen.stroke([(-0.72, 0.22), (0.76, 0.22)], 0.04, _detail(c), outline=False)


def _draw_tree(pen: Pen, c: RGB) -> None:
    pen.rect(-0.08, 0.0, 0.08, 0.5, WOOD)
    pen.blob([(0.0, 0.74, 0.27), (-0.2, 0.56, 0.2), (0.2, 0.56, 0.2), (0.0, 0.5, 0.2)], c)
    for x, y in ((-0.1, 0.72), (0.1, 0.6), (0.02, 0.85)):
        pen.circle(x, y, 0.05, _detail(c), outline=False)


def _draw_house(pen: Pen, c: RGB) -> None:
    roof = (150, 40, 30) if c not in (COLOURS["red"], COLOURS["brown"], COLOURS["pink"]) else (70, 60, 60)
    pen.rect(0.18, 0.7, 0.3, 0.98, (120, 60, 40))
    pen.rect(-0.42, 0.0, 0.42, 0.58, c)
    pen.poly([(-0.54, 0.56), (0.54, 0.56), (0.0, 0.98)], roof)
    door = WOOD if c != COLOURS["brown"] else (70, 40, 20)
    pen.rect(-0.09, 0.0, 0.09, 0.32, door)
    for x in (-0.34, 0.17):
        pen.rect(x, 0.3, x + 0.17, 0.46, GLASS)
        pen.stroke([(x + 0.085, 0.3), (x + 0.085, 0.46)], 0.015, OUTLINE, outline=False)
        pen.stroke([(x, 0.38), (x + 0.17, 0.38)], 0.015, OUTLINE, outline=False)


def _draw_ball(pen: Pen, c: RGB) -> None:
    band = (250, 250, 250) if c != COLOURS["white"] else COLOURS["red"]
    pen.circle(0.0, 0.5, 0.5, c)
    pen.ellipse(-0.47, 0.4, 0.47, 0.6, band, outline=False)
    pen.ellipse(-0.07, 0.03, 0.07, 0.97, band, outline=False)
    pen.circle(-0.2, 0.74, 0.07, mix(c, (255, 255, 255), 0.6), outline=False)
    pen.draw.ellipse(pen.box(-0.5, 0.0, 0.5, 1.0), outline=OUTLINE, width=pen.line)


def _draw_flower(pen: Pen, c: RGB) -> None:
    stem = (50, 140, 40)
    pen.stroke([(0.0, 0.0), (0.0, 0.62)], 0.06, stem)
    pen.poly([(0.0, 0.2), (0.2, 0.4), (0.32, 0.34), (0.12, 0.22)], stem)
    pen.poly([(0.0, 0.3), (-0.2, 0.48), (-0.32, 0.42), (-0.12, 0.3)], stem)
    for k in range(6):
        a = k * math.pi / 3
        pen.circle(0.2 * math.cos(a), 0.76 + 0.2 * math.sin(a), 0.13, c)
    centre = (250, 200, 30) if c not in (COLOURS["yellow"], COLOURS["orange"]) else (120, 70, 20)
    pen.circle(0.0, 0.76, 0.1, centre)


def _draw_umbrella(pen: Pen, c: RGB) -> None:
    pen.stroke([(0.0, 0.78), (0.0, 0.1), (-0.04, 0.02), (-0.12, 0.02), (-0.15, 0.1)], 0.045, (60, 45, 35))
    pen.draw.pieslice(pen.box(-0.62, 0.42, 0.62, 1.16), 180, 360, fill=c, outline=OUTLINE, width=pen.line)
    rib = _detail(c)
    for x in (-0.2, 0.2):
        pen.stroke([(0.0, 1.14), (x, 0.8)], 0.02, rib, outline=False)
    pen.stroke([(0.0, 1.16), (0.0, 1.24)], 0.04, (60, 45, 35), outline=False)


@dataclass(frozen=True)
class ObjectKind:
    name: str
    singular: tuple[str, ...]
    plural: tuple[str, ...]
    colours: tuple[str, ...]
    height: float
    """Typical drawn height as a share of the image side."""
    half_width: float
    """Largest |x| of the drawing, in units of its height (placement keeps it inside the image)."""
    draw: Callable[[Pen, RGB], None]
    verbs: tuple[str, ...] = ()
    water_verbs: tuple[str, ...] = ()
    young: tuple[str, str] | None = None
    """A synonym implying small size (puppy), never used for a big one."""


OBJECTS: dict[str, ObjectKind] = {kind.name: kind for kind in (
    ObjectKind("dog", ("dog", "doggy"), ("dogs", "doggies"), ("brown", "black", "white", "grey"),
               0.3, 0.72, _draw_dog, ("sitting", "standing", "playing"), young=("puppy", "puppies")),
    ObjectKind("cat", ("cat", "kitty"), ("cats", "kitties"), ("black", "white", "grey", "orange", "brown"),
               0.3, 0.5, _draw_cat, ("sitting", "resting"), young=("kitten", "kittens")),
    ObjectKind("rabbit", ("rabbit", "bunny"), ("rabbits", "bunnies"), ("white", "grey", "brown", "black"),
               0.28, 0.54, _draw_rabbit, ("sitting", "resting")),
    ObjectKind("bird", ("bird",), ("birds",), ("red", "blue", "yellow", "black", "white"),
               0.24, 0.72, _draw_bird, ("perched", "standing")),
    ObjectKind("fish", ("fish",), ("fish",), ("orange", "yellow", "blue", "red", "purple"),
               0.24, 0.72, _draw_fish, (), ("swimming",)),
    ObjectKind("car", ("car", "automobile"), ("cars", "automobiles"),
               ("red", "blue", "green", "yellow", "white", "black", "grey", "orange"),
               0.24, 1.0, _draw_car, ("parked",)),
    ObjectKind("boat", ("boat", "sailboat"), ("boats", "sailboats"), ("red", "blue", "white", "yellow", "green"),
               0.32, 0.9, _draw_boat, (), ("floating", "sailing")),
    ObjectKind("tree", ("tree",), ("trees",), ("green", "yellow", "orange"),
               0.48, 0.5, _draw_tree, ("growing", "standing")),
    ObjectKind("house", ("house", "cottage"), ("houses", "cottages"),
               ("red", "blue", "white", "yellow", "pink", "grey", "brown"), 0.44, 0.56, _draw_house,
               ("standing",)),
    ObjectKind("ball", ("ball",), ("balls",), ("red", "blue", "yellow", "green", "orange", "pink", "purple", "white"),
               0.2, 0.52, _draw_ball, ("lying",)),
    ObjectKind("flower", ("flower", "blossom"), ("flowers", "blossoms"),
               ("red", "yellow", "pink", "purple", "white", "orange", "blue"), 0.3, 0.46, _draw_flower,
               ("growing", "blooming")),
    ObjectKind("umbrella", ("umbrella", "parasol"), ("umbrellas", "parasols"),
               ("red", "blue", "yellow", "green", "purple", "pink", "black"), 0.34, 0.64, _draw_umbrella,
               ("standing",)),
)}

SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large", "huge")}
# Drawn height relative to the kind's typical height, by size label.
SIZE_SCALES = {"small": (0.62, 0.78), "medium": (0.9, 1.1), "big": (1.3, 1.5)}


# ---------------------------------------------------------------- drawing scenes


@dataclass(frozen=True)
class Layout:
    """Where objects may stand, as shares of the image side (y of an object's bottom edge)."""

    ground: tuple[float, float]
    sky: tuple[float, float] | None = None


class Canvas:
    """The scene painter's state: image, size, the image's random stream and night tinting."""

    def __init__(self, side: int, rng: np.random.Generator, night: bool) -> None:
        self.S = side
        self.rng = rng
        self.night = night
        self.image = Image.new("RGB", (side, side))
        self.draw = ImageDraw.Draw(self.image)

    def tone(self, colour: RGB, spread: int = 10) -> RGB:
        """A jittered scene colour; at night darker and bluer."""
        jitter = self.rng.integers(-spread, spread + 1, 3)
        r, g, b = (min(255, max(0, c + int(j))) for c, j in zip(colour, jitter, strict=True))
        if self.night:
            r, g, b = int(r * 0.3), int(g * 0.33), int(b * 0.45 + 18)
        return (r, g, b)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: RGB) -> None:
        S = self.S
        self.draw.rectangle([x0 * S, y0 * S, x1 * S, y1 * S], fill=fill)

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, fill: RGB) -> None:
        S = self.S
        self.draw.ellipse([x0 * S, y0 * S, x1 * S, y1 * S], fill=fill)

    def poly(self, points: Sequence[tuple[float, float]], fill: RGB) -> None:
        self.draw.polygon([(x * self.S, y * self.S) for x, y in points], fill=fill)

    def line(self, points: Sequence[tuple[float, float]], fill: RGB, width: float) -> None:
        self.draw.line([(x * self.S, y * self.S) for x, y in points], fill=fill,
                       width=max(1, round(width * self.S)))

    def u(self, a: float, b: float) -> float:
        return float(self.rng.uniform(a, b))

    def sky(self, horizon: float, colour: RGB, *, sun: bool = True, clouds: bool = True) -> None:
        if self.night:
            night_sky = (12 + int(self.rng.integers(0, 10)), 16, 48)
            self.rect(0, 0, 1, horizon, night_sky)
            for _ in range(int(self.rng.integers(12, 30))):
                x, y, r = self.u(0, 1), self.u(0, horizon * 0.95), self.u(0.004, 0.009)
                self.ellipse(x - r, y - r, x + r, y + r, (235, 235, 210))
            mx, my, r = self.u(0.1, 0.9), self.u(0.08, max(0.1, horizon * 0.45)), self.u(0.05, 0.07)
            self.ellipse(mx - r, my - r, mx + r, my + r, (245, 240, 190))
            if self.rng.random() < 0.5:  # a crescent
                self.ellipse(mx - r + r * 0.6, my - r - r * 0.2, mx + r + r * 0.6, my + r - r * 0.2, night_sky)
            return
        top = self.tone(colour)
        bands = 5
        for k in range(bands):
            self.rect(0, horizon * k / bands, 1, horizon * (k + 1) / bands + 0.01,
                      mix(top, (255, 255, 255), 0.35 * k / bands))
        if sun and self.rng.random() < 0.6:
            x, y, r = self.u(0.08, 0.92), self.u(0.06, max(0.08, horizon * 0.4)), self.u(0.05, 0.08)
            self.ellipse(x - r, y - r, x + r, y + r, (255, 225, 80))
        if clouds:
            for _ in range(int(self.rng.integers(0, 3))):
                x, y, w = self.u(0.0, 1.0), self.u(0.05, max(0.06, horizon * 0.6)), self.u(0.1, 0.2)
                for dx, dy, r in ((0.0, 0.0, 0.5), (0.4, -0.2, 0.45), (0.8, 0.0, 0.45)):
                    cx, cy, rr = x + dx * w, y + dy * w, r * w * 0.6
                    self.ellipse(cx - rr, cy - rr * 0.7, cx + rr, cy + rr * 0.7, (250, 250, 252))


def _scene_beach(cv: Canvas) -> Layout:
    h = cv.u(0.36, 0.44)
    cv.sky(h, (110, 175, 235))
    sea = cv.tone((40, 120, 200))
    shore = h + cv.u(0.13, 0.18)
    cv.rect(0, h, 1, shore, sea)
    for _ in range(4):
        y, x = cv.u(h + 0.02, shore - 0.02), cv.u(-0.1, 0.8)
        cv.line([(x, y), (x + cv.u(0.1, 0.3), y)], mix(sea, (255, 255, 255), 0.5), 0.012)
    sand = cv.tone((230, 205, 145))
    cv.rect(0, shore, 1, 1, sand)
    cv.poly([(0, shore), (1, shore), (1, shore + 0.02), (0.5, shore + 0.04), (0, shore + 0.02)],
            mix(sand, (255, 255, 255), 0.5))
    for _ in range(int(cv.rng.integers(3, 7))):
        x, y = cv.u(0, 1), cv.u(shore + 0.05, 1)
        cv.ellipse(x - 0.01, y - 0.006, x + 0.01, y + 0.006, shade(sand, 0.85))
    return Layout(ground=(shore + 0.12, 0.97), sky=(0.12, h - 0.02))


def _scene_snow(cv: Canvas) -> Layout:
    h = cv.u(0.4, 0.5)
    cv.sky(h, (175, 200, 228), sun=False)
    rock = cv.tone((120, 125, 140))
    snowcap = cv.tone((245, 247, 252), 4)
    for _ in range(int(cv.rng.integers(2, 4))):
        x, w, top = cv.u(-0.1, 1.0), cv.u(0.25, 0.45), cv.u(0.12, h - 0.1)
        cv.poly([(x - w / 2, h + 0.01), (x, top), (x + w / 2, h + 0.01)], rock)
        cv.poly([(x - w * 0.13, top + (h - top) * 0.28), (x, top), (x + w * 0.13, top + (h - top) * 0.28)], snowcap)
    ground = cv.tone((240, 243, 250), 5)
    cv.rect(0, h, 1, 1, ground)
    for _ in range(3):
        x, y, w = cv.u(-0.2, 1.0), cv.u(h + 0.1, 0.95), cv.u(0.2, 0.5)
        cv.ellipse(x, y, x + w, y + 0.05, mix(ground, (160, 180, 215), 0.35))
    flake = (255, 255, 255) if not cv.night else (200, 205, 225)
    for _ in range(int(cv.rng.integers(15, 35))):
        x, y = cv.u(0, 1), cv.u(0, 1)
        cv.ellipse(x - 0.006, y - 0.006, x + 0.006, y + 0.006, flake)
    return Layout(ground=(h + 0.2, 0.97), sky=(0.12, h - 0.03))


def _scene_grass(cv: Canvas) -> Layout:
    h = cv.u(0.38, 0.48)
    cv.sky(h, (100, 165, 235))
    hill = cv.tone((120, 190, 90))
    x = cv.u(-0.2, 0.6)
    cv.ellipse(x, h - 0.1, x + cv.u(0.5, 0.9), h + 0.15, hill)
    grass = cv.tone((85, 170, 60))
    cv.rect(0, h, 1, 1, grass)
    tuft = shade(grass, 0.75)
    for _ in range(int(cv.rng.integers(10, 20))):
        x, y = cv.u(0, 1), cv.u(h + 0.05, 1)
        cv.line([(x, y), (x - 0.01, y - 0.03)], tuft, 0.008)
        cv.line([(x, y), (x + 0.012, y - 0.03)], tuft, 0.008)
    return Layout(ground=(h + 0.2, 0.97), sky=(0.12, h - 0.03))


def _scene_road(cv: Canvas) -> Layout:
    h = cv.u(0.3, 0.38)
    cv.sky(h, (120, 180, 235))
    verge = cv.tone((90, 150, 65))
    road_top = h + cv.u(0.1, 0.16)
    cv.rect(0, h, 1, road_top, verge)
    asphalt = cv.tone((85, 85, 92), 6)
    cv.rect(0, road_top, 1, 1, asphalt)
    edge = (235, 235, 235) if not cv.night else (150, 150, 150)
    cv.line([(0, road_top + 0.02), (1, road_top + 0.02)], edge, 0.012)
    mid = (road_top + 1) / 2 + cv.u(-0.03, 0.03)
    dash = (245, 205, 40) if not cv.night else (170, 150, 50)
    offset = cv.u(0, 0.2)
    for k in range(-1, 6):
        x = offset + k * 0.2
        cv.rect(x, mid - 0.008, x + 0.1, mid + 0.008, dash)
    return Layout(ground=(road_top + 0.14, 0.97), sky=(0.1, h - 0.03))


def _scene_lake(cv: Canvas) -> Layout:
    h = cv.u(0.3, 0.38)
    cv.sky(h, (120, 180, 240))
    shore = cv.tone((50, 110, 60))
    cv.rect(0, h - 0.02, 1, h + 0.05, shore)
    for _ in range(int(cv.rng.integers(5, 10))):
        x = cv.u(0, 1)
        cv.poly([(x - 0.025, h + 0.0), (x, h - cv.u(0.05, 0.09)), (x + 0.025, h)], shade(shore, 0.75))
    water = cv.tone((45, 105, 185))
    cv.rect(0, h + 0.05, 1, 1, water)
    ripple = mix(water, (255, 255, 255), 0.35)
    for _ in range(int(cv.rng.integers(6, 12))):
        x, y = cv.u(-0.1, 1), cv.u(h + 0.08, 1)
        w = cv.u(0.06, 0.16)
        cv.line([(x, y), (x + w / 2, y - 0.01), (x + w, y)], ripple, 0.01)
    return Layout(ground=(h + 0.25, 0.95), sky=(0.1, h - 0.04))


def _scene_room(cv: Canvas) -> Layout:
    h = cv.u(0.55, 0.62)
    palette = [(235, 220, 190), (200, 225, 205), (200, 215, 235), (235, 205, 205)]
    wall = cv.tone(palette[int(cv.rng.integers(len(palette)))], 6)
    cv.rect(0, 0, 1, h, wall)
    x = cv.u(0.05, 0.6)
    y0, y1 = cv.u(0.08, 0.14), cv.u(0.34, 0.42)
    frame = (250, 250, 250)
    cv.rect(x - 0.02, y0 - 0.02, x + 0.32, y1 + 0.02, frame)
    cv.rect(x, y0, x + 0.3, y1, (150, 200, 240))
    cv.line([(x + 0.15, y0), (x + 0.15, y1)], frame, 0.015)
    cv.line([(x, (y0 + y1) / 2), (x + 0.3, (y0 + y1) / 2)], frame, 0.015)
    px = cv.u(0.05, 0.85) if (x > 0.4 or x < 0.2) else 0.8
    if abs(px - x - 0.15) > 0.3:
        cv.rect(px, 0.12, px + 0.12, 0.26, shade(wall, 0.6))
        cv.rect(px + 0.015, 0.135, px + 0.105, 0.245, cv.tone((200, 160, 90), 40))
    cv.rect(0, h - 0.02, 1, h + 0.01, shade(wall, 0.8))
    wood = cv.tone((165, 115, 65))
    cv.rect(0, h + 0.01, 1, 1, wood)
    for k in range(1, 6):
        y = h + (1 - h) * k / 6 + 0.01
        cv.line([(0, y), (1, y)], shade(wood, 0.8), 0.006)
    return Layout(ground=(h + 0.14, 0.97))


def _scene_forest(cv: Canvas) -> Layout:
    h = cv.u(0.45, 0.55)
    cv.sky(h, (150, 185, 210), sun=False, clouds=False)
    for layer, tone in ((0, (40, 95, 55)), (1, (25, 75, 40))):
        for _ in range(int(cv.rng.integers(6, 10))):
            x = cv.u(-0.05, 1.05)
            top = cv.u(0.05, 0.25) + layer * 0.08
            w = cv.u(0.06, 0.1)
            cv.rect(x - 0.012, h - 0.06, x + 0.012, h + 0.02, (70, 45, 30) if not cv.night else (25, 18, 20))
            cv.poly([(x - w, h - 0.04), (x, top), (x + w, h - 0.04)], cv.tone(tone, 8))
    floor = cv.tone((80, 95, 45))
    cv.rect(0, h, 1, 1, floor)
    for _ in range(int(cv.rng.integers(6, 12))):
        x, y = cv.u(0, 1), cv.u(h + 0.03, 1)
        cv.ellipse(x - 0.02, y - 0.008, x + 0.02, y + 0.008, shade(floor, 0.7))
    return Layout(ground=(h + 0.18, 0.97), sky=(0.1, h - 0.25))


def _scene_desert(cv: Canvas) -> Layout:
    h = cv.u(0.4, 0.5)
    cv.sky(h, (245, 215, 160), clouds=False)
    far = cv.tone((215, 160, 95))
    for _ in range(3):
        x, w = cv.u(-0.3, 0.9), cv.u(0.4, 0.8)
        cv.ellipse(x, h - 0.08, x + w, h + 0.1, far)
    sand = cv.tone((235, 185, 110))
    cv.rect(0, h, 1, 1, sand)
    for _ in range(2):
        x, y, w = cv.u(-0.4, 0.8), cv.u(h + 0.08, 0.85), cv.u(0.5, 0.9)
        cv.ellipse(x, y, x + w, y + 0.3, shade(sand, 0.9))
    if cv.rng.random() < 0.6:
        x = cv.u(0.05, 0.95)
        cactus = cv.tone((70, 140, 70))
        cv.rect(x - 0.012, h - 0.08, x + 0.012, h + 0.02, cactus)
        cv.rect(x - 0.04, h - 0.05, x - 0.028, h - 0.01, cactus)
        cv.rect(x - 0.04, h - 0.02, x, h - 0.008, cactus)
    return Layout(ground=(h + 0.18, 0.97), sky=(0.1, h - 0.05))


def _scene_city(cv: Canvas) -> Layout:
    h = cv.u(0.5, 0.58)
    cv.sky(h, (160, 180, 205), sun=False)
    x = -0.05
    while x < 1.0:
        w = cv.u(0.1, 0.2)
        top = cv.u(0.08, h - 0.15)
        body = cv.tone([(120, 120, 130), (150, 130, 115), (100, 110, 125)][int(cv.rng.integers(3))], 12)
        cv.rect(x, top, x + w, h, body)
        lit = (250, 225, 120) if cv.night else mix(body, (210, 230, 245), 0.6)
        for wy in np.arange(top + 0.03, h - 0.04, 0.06):
            for wx in np.arange(x + 0.02, x + w - 0.03, 0.045):
                if not cv.night or cv.rng.random() < 0.55:
                    cv.rect(float(wx), float(wy), float(wx) + 0.022, float(wy) + 0.028, lit)
        x += w + cv.u(0.0, 0.03)
    pavement = cv.tone((165, 165, 160), 6)
    cv.rect(0, h, 1, 1, pavement)
    kerb = shade(pavement, 0.75)
    for k in range(1, 5):
        cv.line([(0, h + (1 - h) * k / 5), (1, h + (1 - h) * k / 5)], kerb, 0.005)
    return Layout(ground=(h + 0.18, 0.97), sky=(0.08, h - 0.35))


@dataclass(frozen=True)
class SceneKind:
    name: str
    phrases: tuple[str, ...]
    """Prepositional phrases: 'on a beach'."""
    nouns: tuple[str, ...]
    """Noun phrases for 'a beach with a dog'."""
    draw: Callable[[Canvas], Layout]
    outdoor: bool = True


SCENES: dict[str, SceneKind] = {kind.name: kind for kind in (
    SceneKind("beach", ("on a beach", "on the beach", "on the sand", "by the sea", "at the seaside"),
              ("a beach", "a sandy beach", "the seaside"), _scene_beach),
    SceneKind("snow", ("in the snow", "on a snowy field", "in a winter landscape", "on snowy ground"),
              ("a snowy field", "a snowy landscape", "a winter landscape"), _scene_snow),
    SceneKind("grass", ("on the grass", "in a meadow", "on a lawn", "in a grassy field"),
              ("a meadow", "a grassy field", "a lawn"), _scene_grass),
    SceneKind("road", ("on a road", "on the road", "on an asphalt road", "on a highway"),
              ("a road", "an asphalt road", "a highway"), _scene_road),
    SceneKind("lake", ("on a lake", "on the water", "on a calm lake", "in the water"),
              ("a lake", "a calm lake", "open water"), _scene_lake),
    SceneKind("room", ("in a room", "indoors", "in a living room", "on a wooden floor"),
              ("a room", "a living room", "an indoor scene"), _scene_room, outdoor=False),
    SceneKind("forest", ("in a forest", "in the woods", "in a pine forest"),
              ("a forest", "the woods", "a pine forest"), _scene_forest),
    SceneKind("desert", ("in the desert", "on sand dunes", "in a sandy desert"),
              ("a desert", "sand dunes", "a sandy desert"), _scene_desert),
    SceneKind("city", ("in a city", "on a city street", "downtown", "in front of tall buildings"),
              ("a city street", "a city", "a downtown street"), _scene_city),
)}

NIGHT_PHRASES = ("at night", "in the dark", "under the night sky", "at nighttime")
OBJECT_NAMES = tuple(OBJECTS)
SCENE_NAMES = tuple(SCENES)


# ---------------------------------------------------------------- sampling a scene


@dataclass
class Group:
    """Instances of one kind sharing colour and size: 'two red cars'."""

    kind: str
    count: int
    colour: str
    size: str = "medium"
    flying: bool = False
    xs: list[float] = field(default_factory=list)

    @property
    def x(self) -> float:
        return float(np.mean(self.xs)) if self.xs else 0.5


@dataclass
class Instance:
    kind: str
    colour: RGB
    cx: float
    base: float
    height: float
    flip: int


@dataclass
class SceneSpec:
    scene: str
    night: bool
    groups: list[Group]
    instances: list[Instance]
    heldout: bool = False

    def record(self) -> dict[str, Any]:
        objects = []
        for g in self.groups:
            entry: dict[str, Any] = {"object": g.kind, "count": g.count, "colour": g.colour, "size": g.size,
                                     "x": round(g.x, 3)}
            if g.flying:
                entry["flying"] = True
            objects.append(entry)
        return {"scene": self.scene, "night": self.night, "objects": objects, "heldout": self.heldout}


# (number of groups, count per group) with their probabilities; three objects at most
_COMPOSITIONS: tuple[tuple[tuple[int, ...], float], ...] = (
    ((1,), 0.38), ((2,), 0.14), ((3,), 0.08), ((1, 1), 0.22), ((2, 1), 0.1), ((1, 1, 1), 0.08),
)


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _sample_spec(rng: np.random.Generator, *, banned: frozenset[tuple[str, str]],
                 forced: tuple[str, str] | None = None) -> SceneSpec:
    """Choose scene, objects, colours, sizes and places; ``banned`` pairs never appear, ``forced`` one does."""
    scene = forced[1] if forced else _pick(rng, SCENE_NAMES)
    kind = SCENES[scene]
    night = kind.outdoor and rng.random() < NIGHT_PROBABILITY
    counts = _COMPOSITIONS[int(rng.choice(len(_COMPOSITIONS), p=[p for _, p in _COMPOSITIONS]))][0]
    allowed = [o for o in OBJECT_NAMES if (o, scene) not in banned and (not forced or o != forced[0])]
    picked = [str(o) for o in rng.permutation(allowed)[: len(counts) - (1 if forced else 0)]]
    kinds = ([forced[0]] if forced else []) + picked
    counts = tuple(sorted(counts, reverse=True))[: len(kinds)]
    groups = []
    for name, count in zip(kinds, counts, strict=True):
        spec = OBJECTS[name]
        groups.append(Group(name, count, _pick(rng, spec.colours),
                            flying=name == "bird" and kind.outdoor and rng.random() < 0.35))
    # Left-to-right order of groups is random; a group's instances stand side by side.
    order = [int(i) for i in rng.permutation(len(groups))]
    n_slots = sum(counts)
    slot_w = 1.0 / n_slots
    instances: list[Instance] = []
    size_draw = {id(g): _pick(rng, ("small", "medium", "medium", "big")) for g in groups}
    layout_scale = 1.0 if n_slots == 1 else 0.9
    slot = 0
    for gi in order:
        g = groups[gi]
        spec = OBJECTS[g.kind]
        lo, hi = SIZE_SCALES[size_draw[id(g)]]
        height = spec.height * float(rng.uniform(lo, hi)) * layout_scale
        # Shrink what would not fit its slot, and let the caption's size word follow the result.
        width = 2 * spec.half_width * height
        if width > slot_w * 1.15:
            height *= slot_w * 1.15 / width
        ratio = height / spec.height
        g.size = "small" if ratio < 0.8 else "big" if ratio > 1.22 else "medium"
        flip = 1 if rng.random() < 0.5 else -1
        colour = COLOURS[g.colour]
        for _ in range(g.count):
            half = spec.half_width * height
            lo_x, hi_x = slot * slot_w + 0.2 * slot_w, (slot + 1) * slot_w - 0.2 * slot_w
            cx = float(rng.uniform(lo_x, hi_x))
            cx = min(max(cx, half + 0.01), 1 - half - 0.01) if half < 0.49 else 0.5
            instances.append(Instance(g.kind, colour, cx, 0.0, height, flip))
            g.xs.append(cx)
            slot += 1
    return SceneSpec(scene, night, groups, instances, heldout=bool(forced))


def _place_vertically(spec: SceneSpec, layout: Layout, rng: np.random.Generator) -> None:
    flying = {g.kind for g in spec.groups if g.flying}
    for inst in spec.instances:
        if inst.kind in flying and layout.sky is not None:
            lo, hi = layout.sky
            inst.base = float(rng.uniform(lo + inst.height, max(lo + inst.height, hi)))
        else:
            lo, hi = layout.ground
            inst.base = float(rng.uniform(min(lo, hi), hi))
        # nothing may leave the top of the image
        inst.base = max(inst.base, inst.height * 1.25 + 0.01)


def _render(spec: SceneSpec, rng: np.random.Generator, size: int) -> Image.Image:
    # Drawn at about 256 px and box-filtered down: anti-aliased edges keep shapes readable at 64 px.
    factor = max(1, math.ceil(256 / size))
    side = size * factor
    cv = Canvas(side, rng, spec.night)
    layout = SCENES[spec.scene].draw(cv)
    _place_vertically(spec, layout, rng)
    line = max(factor, round(side * 0.012))
    for inst in sorted(spec.instances, key=lambda i: i.base):
        colour = shade(inst.colour, 0.85) if spec.night else inst.colour
        pen = Pen(cv.draw, inst.cx * side, inst.base * side, inst.height * side, inst.flip, line)
        OBJECTS[inst.kind].draw(pen, colour)
    return cv.image.reduce(factor) if factor > 1 else cv.image


# ---------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(rng: np.random.Generator, g: Group, *, colour_p: float = 0.65, size_p: float = 0.65,
                 common_only: bool = False) -> str:
    kind = OBJECTS[g.kind]
    nouns = list(kind.plural if g.count > 1 else kind.singular)
    if common_only:
        # general wording: the common name alone (synonyms are target-domain words)
        nouns = nouns[:1]
    elif kind.young and g.size != "big":
        nouns.append(kind.young[1] if g.count > 1 else kind.young[0])
    noun = _pick(rng, nouns)
    adjectives = []
    if g.size != "medium" and rng.random() < size_p:
        adjectives.append(_pick(rng, SIZE_WORDS[g.size]))
    if rng.random() < colour_p:
        adjectives.append(g.colour)
    words = adjectives + [noun]
    if g.count == 1:
        return " ".join([_article(words[0])] + words)
    count = {2: ("two", "two", "a pair of"), 3: ("three",)}[g.count]
    return " ".join([_pick(rng, count)] + words)


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _position(x: float) -> str:
    return "on the left" if x < 0.4 else "on the right" if x > 0.6 else "in the middle"


def _verb(rng: np.random.Generator, g: Group, scene: str) -> str | None:
    kind = OBJECTS[g.kind]
    if g.flying:
        return "flying"
    verbs = kind.water_verbs if scene in ("lake", "beach") and kind.water_verbs else kind.verbs
    return _pick(rng, verbs) if verbs else None


# Which caption templates (by position in _caption's lists) each wording uses: general captions
# read like alt text ("a photo of a dog on a beach"), target ones describe the layout.
_GENERAL_SINGLE, _GENERAL_MULTI = (0, 1, 4), (0, 2)


def _caption(rng: np.random.Generator, spec: SceneSpec, wording: str = "mixed") -> str:
    scene = SCENES[spec.scene]
    # general wording: mostly the common name of a scene and an object, rarely another one
    common = wording == "general" and rng.random() >= GENERAL_RARE_WORD_SHARE
    where = scene.phrases[0] if common else _pick(rng, scene.phrases)
    noun = scene.nouns[0] if common else _pick(rng, scene.nouns)
    night = f" {_pick(rng, NIGHT_PHRASES)}" if spec.night and rng.random() < 0.85 else ""
    groups = spec.groups
    nps = [_noun_phrase(rng, g, common_only=common) for g in groups]
    be = "are" if groups[0].count > 1 else "is"
    if len(groups) == 1:
        g, np_ = groups[0], nps[0]
        pos = f" {_position(g.x)}" if g.count == 1 and rng.random() < 0.6 else ""
        verb = _verb(rng, g, spec.scene)
        templates = [
            f"{np_} {where}{night}",
            f"a photo of {np_} {where}{night}",
            f"{noun}{night} with {np_}{pos}",
            f"there {be} {np_}{pos} {where}{night}",
            f"an image of {np_} {where}{night}",
        ]
        if pos:
            templates.append(f"{np_}{pos}")
        if verb:
            templates += [f"{np_} {verb} {where}{night}"] * 2
        if g.flying:
            templates.append(f"{np_} flying over {noun}{night}")
        return _pick(rng, _worded(templates, _GENERAL_SINGLE, wording))
    # several kinds: relations follow their left-to-right order in the picture
    by_x = sorted(range(len(groups)), key=lambda i: groups[i].x)
    ordered = [nps[i] for i in by_x]
    shuffled = [nps[i] for i in rng.permutation(len(nps))]
    templates = [
        f"{_join(shuffled)} {where}{night}",
        f"{noun}{night} with {_join(shuffled)}",
        f"a photo of {_join(shuffled)} {where}{night}",
        f"there {be} {_join(nps)} {where}{night}",
        f"{_join(ordered)} from left to right {where}{night}",
    ]
    if len(groups) == 2:
        left, right = ordered
        templates += [
            f"{left} to the left of {right} {where}{night}",
            f"{right} to the right of {left} {where}{night}",
            f"{shuffled[0]} next to {shuffled[1]} {where}{night}",
        ]
    return _pick(rng, _worded(templates, _GENERAL_MULTI, wording))


def _worded(templates: list[str], general: tuple[int, ...], wording: str) -> list[str]:
    if wording == "general":
        return [templates[i] for i in general]
    if wording == "target":
        return [t for i, t in enumerate(templates) if i not in general]
    return templates


def _captions(rng: np.random.Generator, spec: SceneSpec, domain: str = "mixed") -> list[str]:
    wanted = int(rng.integers(2, 6))
    captions: list[str] = []
    for _ in range(40):
        wording = domain
        if domain == "target" and rng.random() >= TARGET_WORDING_SHARE:
            wording = "general"
        caption = _caption(rng, spec, wording)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == wanted:
                break
    return captions


def vocabulary() -> dict[str, Any]:
    """The words captions use, for synth.json and for checking captions against what was drawn."""
    return {
        "objects": {name: {"singular": list(k.singular) + ([k.young[0]] if k.young else []),
                           "plural": list(k.plural) + ([k.young[1]] if k.young else []),
                           "colours": list(k.colours)} for name, k in OBJECTS.items()},
        "scenes": {name: {"phrases": list(k.phrases), "nouns": list(k.nouns), "night": k.outdoor}
                   for name, k in SCENES.items()},
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "sizes": {name: list(words) for name, words in SIZE_WORDS.items()},
        "night": list(NIGHT_PHRASES),
    }


# ---------------------------------------------------------------- data set


def choose_heldout(seed: int, n_test: int, fraction: float = HELDOUT_FRACTION) -> list[tuple[str, str]]:
    """The (object, scene) pairs reserved for test, a function of the seed.

    About ``fraction`` of all pairs, but never more than there are test images (each is
    shown at least once in test) and spread so that no scene or object loses many.
    """
    if n_test <= 0:
        return []
    pairs = [(o, s) for o in OBJECT_NAMES for s in SCENE_NAMES]
    target = min(round(fraction * len(pairs)), n_test)
    order = np.random.default_rng([seed, 104729]).permutation(len(pairs))
    # the tightest even spread that the greedy pass can fill
    for slack in range(len(pairs)):
        cap_scene = math.ceil(target / len(SCENE_NAMES)) + slack
        cap_object = math.ceil(target / len(OBJECT_NAMES)) + slack
        per_scene: dict[str, int] = {}
        per_object: dict[str, int] = {}
        chosen: list[tuple[str, str]] = []
        for index in order:
            o, s = pairs[int(index)]
            if len(chosen) < target and per_scene.get(s, 0) < cap_scene and per_object.get(o, 0) < cap_object:
                chosen.append((o, s))
                per_scene[s] = per_scene.get(s, 0) + 1
                per_object[o] = per_object.get(o, 0) + 1
        if len(chosen) == target:
            break
    return sorted(chosen, key=lambda p: (OBJECT_NAMES.index(p[0]), SCENE_NAMES.index(p[1])))


def choose_target_only(seed: int, fraction: float = TARGET_ONLY_FRACTION) -> list[tuple[str, str]]:
    """The (object, scene) pairs that only the target domain shows, a function of the seed.

    Spread over scenes and objects so that no scene or object becomes target-only as a whole:
    the general set still teaches every word, just not every combination.
    """
    pairs = [(o, s) for o in OBJECT_NAMES for s in SCENE_NAMES]
    target = round(fraction * len(pairs))
    order = np.random.default_rng([seed, 7919]).permutation(len(pairs))
    cap_scene = math.ceil(target / len(SCENE_NAMES))
    cap_object = math.ceil(target / len(OBJECT_NAMES))
    per_scene: dict[str, int] = {}
    per_object: dict[str, int] = {}
    chosen: list[tuple[str, str]] = []
    for index in order:
        o, s = pairs[int(index)]
        if len(chosen) < target and per_scene.get(s, 0) < cap_scene and per_object.get(o, 0) < cap_object:
            chosen.append((o, s))
            per_scene[s] = per_scene.get(s, 0) + 1
            per_object[o] = per_object.get(o, 0) + 1
    return sorted(chosen, key=lambda p: (OBJECT_NAMES.index(p[0]), SCENE_NAMES.index(p[1])))


@dataclass
class SynthSummary:
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    """split -> pair file."""
    images: dict[str, int] = field(default_factory=dict)
    captions: dict[str, int] = field(default_factory=dict)
    metadata: Path | None = None
    heldout: list[tuple[str, str]] = field(default_factory=list)
    domain: str = "mixed"
    target_only: list[tuple[str, str]] = field(default_factory=list)
    """Pairs the general domain never shows (empty for "mixed")."""


def split_counts(n: int, val_frac: float, test_frac: float) -> dict[str, int]:
    n_val, n_test = round(n * val_frac), round(n * test_frac)
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def _check_arguments(n: int, seed: int, size: int, val_frac: float, test_frac: float,
                     domain: str = "mixed") -> None:
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r}: a domain must be one of {', '.join(DOMAINS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: the number of images must be a positive integer")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: the seed must be a non-negative integer")
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size={size!r}: the image side must be an integer from {MIN_SIZE} to {MAX_SIZE} pixels")
    for name, value in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r}: a split fraction must be in [0, 1)")
    if split_counts(n, val_frac, test_frac)["train"] < 1:
        raise ValueError(f"val_frac={val_frac} + test_frac={test_frac} of n={n} leaves no training image; "
                         "lower the fractions or raise n")


_OUTPUTS = ("images", "train.jsonl", "val.jsonl", "test.jsonl", "synth.json")


def generate(out_dir: str | os.PathLike[str], n: int, *, seed: int = 0, size: int = 64,
             val_frac: float = 0.1, test_frac: float = 0.1, show_progress: bool = False,
             overwrite: bool = False, domain: str = "mixed") -> SynthSummary:
    """Render ``n`` captioned scenes into ``out_dir`` (layout in the module docstring).

    ``domain`` (see ``DOMAINS``): "general" and "target" made with the same seed are the
    pre-training set and the target domain of one experiment; they draw from different random
    streams and agree on which object-scene pairs are target-only.

    Everything is built in a temporary folder beside ``out_dir`` and moved into place at the
    end, ``synth.json`` last, so a failure leaves an earlier data set untouched. An existing
    data set in ``out_dir`` is replaced only with ``overwrite``.
    """
    _check_arguments(n, seed, size, val_frac, test_frac, domain)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory; choose another output folder")
    present = [name for name in _OUTPUTS if (out / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{out}: already holds {', '.join(present)}; pass overwrite=True "
                              "(--overwrite) to replace them, or choose another output folder")
    counts = split_counts(n, val_frac, test_frac)
    heldout = choose_heldout(seed, counts["test"])
    banned = frozenset(heldout)
    held = frozenset(heldout)
    target_only = choose_target_only(seed) if domain != "mixed" else []
    test_banned: frozenset[tuple[str, str]] = frozenset()
    if domain == "general":
        # the general set never shows a target-only pair, in any split
        banned = banned | frozenset(target_only)
        test_banned = frozenset(target_only)
        heldout = [p for p in heldout if p not in test_banned]
    # target train/val images may be built around target-only pairs that test does not hold out
    trainable_target_only = [p for p in target_only if p not in banned]
    domain_code = DOMAINS.index(domain)
    width = max(5, len(str(max(counts.values()) - 1)))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.synth-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    summary = SynthSummary(out_dir=out, heldout=heldout, domain=domain, target_only=target_only)
    records: dict[str, Any] = {}
    seen: set[bytes] = set()
    try:
        progress = tqdm(total=n, desc="synth", unit="img", disable=not show_progress)
        with progress:
            for code, split in enumerate(SPLITS):
                folder = staging / "images" / split
                folder.mkdir(parents=True)
                lines = []
                n_captions = 0
                for index in range(counts[split]):
                    # "mixed" keeps its original streams, so its files stay what they were
                    rng = np.random.default_rng([seed, code, index] + ([domain_code] if domain_code else []))
                    forced = None
                    if split == "test" and heldout:
                        if index < len(heldout):
                            forced = heldout[index]
                        elif rng.random() < TEST_HELDOUT_SHARE:
                            forced = heldout[int(rng.integers(len(heldout)))]
                    if forced is None and domain == "target":
                        pool = target_only if split == "test" else trainable_target_only
                        if pool and rng.random() < TARGET_ONLY_SHARE:
                            forced = pool[int(rng.integers(len(pool)))]
                    image, spec = _unique_render(rng, seen, banned if split != "test" else test_banned, forced,
                                                 size)
                    spec.heldout = forced in held  # a target-only pair in train is not held out
                    name = f"{index:0{width}d}"
                    relative = f"images/{split}/{name}.png"
                    # no metadata chunks, fixed compression: the same pixels give the same bytes
                    image.save(staging / relative, format="PNG", compress_level=6)
                    captions = _captions(rng, spec, domain)
                    image_id = f"{split}-{name}"
                    lines.append(json.dumps({"image": relative, "text": captions, "image_id": image_id}))
                    records[image_id] = {"split": split, "image": relative, **spec.record()}
                    n_captions += len(captions)
                    progress.update(1)
                (staging / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
                summary.files[split] = out / f"{split}.jsonl"
                summary.images[split] = counts[split]
                summary.captions[split] = n_captions
        meta = {
            "format": "vkd-synth",
            "version": FORMAT_VERSION,
            "seed": seed,
            "n": n,
            "size": size,
            "val_frac": val_frac,
            "test_frac": test_frac,
            "counts": counts,
            "captions": summary.captions,
            "pair_files": {split: f"{split}.jsonl" for split in SPLITS},
            "heldout": [list(p) for p in heldout],
            "heldout_fraction": HELDOUT_FRACTION,
            "domain": domain,
            "target_only": [list(p) for p in target_only],
            "vocab": vocabulary(),
            "images": records,
        }
        (staging / "synth.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        out.mkdir(exist_ok=True)
        for name in _OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary.metadata = out / "synth.json"
    return summary


def _unique_render(rng: np.random.Generator, seen: set[bytes], banned: frozenset[tuple[str, str]],
                   forced: tuple[str, str] | None, size: int) -> tuple[Image.Image, SceneSpec]:
    """Sample and draw until the pixels differ from every image so far (test must hold only new renders)."""
    for _ in range(100):
        spec = _sample_spec(rng, banned=banned, forced=forced)
        image = _render(spec, rng, size)
        digest = hashlib.sha1(image.tobytes()).digest()
        if digest not in seen:
            seen.add(digest)
            return image, spec
    raise RuntimeError(f"could not draw a new {size}x{size} image in 100 tries; use a larger --size")


# ---------------------------------------------------------------- preview


def preview_grid(pair_file: str | os.PathLike[str], out_path: str | os.PathLike[str], *, count: int = 16,
                 columns: int = 4, scale: int = 4) -> Path:
    """Tile the first ``count`` images of a pair file, enlarged ``scale``×, each over its first caption."""
    pair_file = Path(pair_file)
    entries = []
    with pair_file.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                entries.append(json.loads(line))
            if len(entries) == count:
                break
    if not entries:
        raise ValueError(f"{pair_file}: no pairs to preview")
    tiles = []
    for entry in entries:
        image = load_image(pair_file.parent / entry["image"])
        tiles.append((image.resize((image.width * scale, image.height * scale), Image.NEAREST), entry["text"]))
    tile_w, tile_h = tiles[0][0].size
    font = ImageFont.load_default()
    wrap = max(10, tile_w // 7)
    text_h = 4 * 13
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * (tile_w + 8), rows * (tile_h + text_h + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (tile, text) in enumerate(tiles):
        x, y = (k % columns) * (tile_w + 8) + 4, (k // columns) * (tile_h + text_h + 8) + 4
        sheet.paste(tile, (x, y))
        caption = text[0] if isinstance(text, list) else text
        for j, row in enumerate(textwrap.wrap(caption, wrap)[:4]):
            draw.text((x, y + tile_h + 2 + 13 * j), row, fill=(0, 0, 0), font=font)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path)
    return out_path
