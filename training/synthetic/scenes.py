"""Seeded synthetic scenes: one or a few identical shapes of one colour, at a named position, maybe with a letter.

`generate_scene` returns the image with its ground-truth `SceneFacts`; `scene_questions` turns the facts into
questions whose answers are single words of the tiny tokenizer's vocabulary (colours, shapes, positions, number
words, letters A-E, yes / no), so that an evaluation can score exact matches.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (130, 50, 170),
    "orange": (245, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "pink": (245, 150, 190),
    "brown": (130, 80, 40),
    "cyan": (40, 200, 220),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "rectangle", "ellipse")
# Where a single shape's centre sits, as fractions of the width and height.
POSITIONS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78), "centre": (0.5, 0.5)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
LETTERS = ("A", "B", "C", "D", "E")
MAX_COUNT = 4
SINGLE_WORD = "Answer with a single word."


@dataclass(frozen=True)
class SceneFacts:
    """The ground truth of one scene. `position` is set only for a single shape; `letter` only when drawn."""

    shape: str
    colour: str
    count: int
    position: str | None
    letter: str | None
    width: int
    height: int

    def caption(self) -> str:
        """A one-sentence description (stage-1 caption)."""
        if self.count == 1:
            article = "an" if self.colour[0] in "aeiou" else "a"
            where = {"left": "on the left", "right": "on the right", "centre": "in the centre"}.get(
                self.position, f"at the {self.position}"
            )
            text = f"The image shows {article} {self.colour} {self.shape} {where}."
        else:
            text = f"The image shows {NUMBER_WORDS[self.count]} {self.colour} {self.shape} shapes."
        return text + (f" The text says {self.letter}." if self.letter else "")


def _background(colour: str) -> tuple[int, int, int]:
    return (40, 40, 40) if colour in ("white", "grey", "yellow", "cyan", "pink") else (235, 235, 235)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy, r), 3, fill=fill)
    elif shape == "star":
        points = [
            (
                cx + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "rectangle":
        draw.rectangle((cx - r, cy - r / 2, cx + r, cy + r / 2), fill=fill)
    elif shape == "ellipse":
        draw.ellipse((cx - r, cy - r / 2, cx + r, cy + r / 2), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def generate_scene(rng: random.Random | int, width: int = 64, height: int = 64) -> tuple[Image.Image, SceneFacts]:
    """A `width` x `height` RGB scene drawn from `rng` (a `random.Random` or a seed), and its facts."""
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    count = rng.randint(1, MAX_COUNT)
    letter = rng.choice(LETTERS) if rng.random() < 0.4 else None
    image = Image.new("RGB", (width, height), _background(colour))
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    if count == 1:
        position = rng.choice(sorted(POSITIONS))
        fx, fy = POSITIONS[position]
        centres = [(fx * width, fy * height)]
        radius = side * 0.18
    else:
        position = None
        cells = [(col, row) for row in range(2) for col in range(2)]
        rng.shuffle(cells)
        centres = [((col + 0.5) * width / 2, (row + 0.5) * height / 2) for col, row in cells[:count]]
        radius = side * 0.16
    for cx, cy in centres:
        _draw_shape(draw, shape, cx, cy, radius, COLOURS[colour])
    if letter:
        ink = (255, 255, 255) if sum(_background(colour)) < 300 else (0, 0, 0)
        draw.text((1, 0), letter, fill=ink, font=ImageFont.load_default(size=max(8, side // 4)))
    return image, SceneFacts(shape, colour, count, position, letter, width, height)


def scene_questions(facts: SceneFacts, rng: random.Random | int = 0) -> list[tuple[str, str]]:
    """Questions about the scene with their single-word answers."""
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    pairs = [
        (f"What colour is the shape? {SINGLE_WORD}", facts.colour),
        (f"What shape is in the image? {SINGLE_WORD}", facts.shape),
        (f"How many shapes are there? {SINGLE_WORD}", NUMBER_WORDS[facts.count]),
    ]
    if facts.position is not None:
        pairs.append((f"Where is the shape? {SINGLE_WORD}", facts.position))
    if facts.letter is not None:
        pairs.append((f"Which letter is in the image? {SINGLE_WORD}", facts.letter))
    asked_colour = facts.colour if rng.random() < 0.5 else rng.choice(sorted(set(COLOURS) - {facts.colour}))
    pairs.append(
        (f"Is there a {asked_colour} {facts.shape}? {SINGLE_WORD}", "yes" if asked_colour == facts.colour else "no")
    )
    return pairs
