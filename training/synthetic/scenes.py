"""Seeded synthetic scenes: one or a few identical shapes of one colour, at a named position, maybe with a letter.

`generate_scene` returns the image with its ground-truth `SceneFacts`; `scene_questions` turns the facts into
questions whose answers are single words of the tiny tokenizer's vocabulary (colours, shapes, positions, number
words, letters A-E, yes / no), so that an evaluation can score exact matches. A preset (`PRESETS`) says what the
scenes may hold and what is asked about them: `standard` varies everything, `easy` draws one large shape on white,
asked only what a tiny model learns from a few hundred steps.
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
QUESTION_KINDS = ("colour", "shape", "count", "position", "letter", "yes_no")
SINGLE_WORD = "Answer with a single word."
WHITE = (255, 255, 255)
# (width, height): square, wide and tall, at 1x-3x the tiny tower's 32 px input.
DEFAULT_SIZES = ((32, 32), (64, 32), (32, 64), (64, 64), (96, 32), (32, 96), (96, 64), (64, 96))


@dataclass(frozen=True)
class ScenePreset:
    """What a preset's scenes may hold, how they are drawn, and which kinds of question they are asked."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    positions: tuple[str, ...]  # where a single shape may sit (keys of POSITIONS)
    max_count: int  # shapes per scene, 1..max_count (several shapes fill the cells of a 2 x 2 grid)
    letter_rate: float  # how often a letter is drawn in the top-left corner
    radius: float  # a single shape's radius, as a fraction of the image's shorter side
    plain_background: bool  # white; otherwise dark or light, whichever contrasts with the shape's colour
    questions: tuple[str, ...]  # kinds of QUESTION_KINDS asked (count, position, letter only where they apply)
    sizes: tuple[tuple[int, int], ...]  # the (width, height) a dataset or task draws its scenes at

    def __post_init__(self) -> None:
        for name, chosen, known in (
            ("colours", self.colours, COLOURS),
            ("shapes", self.shapes, SHAPES),
            ("positions", self.positions, POSITIONS),
            ("questions", self.questions, QUESTION_KINDS),
        ):
            if not chosen or set(chosen) - set(known):
                raise ValueError(f"preset {name} {chosen}: expected some of {tuple(known)}")
        if self.plain_background and "white" in self.colours:
            raise ValueError("a preset on a plain white background cannot draw white shapes")
        if not 1 <= self.max_count <= 4:
            raise ValueError(f"preset max_count {self.max_count}: expected 1..4 (the cells of a 2 x 2 grid)")


PRESETS: dict[str, ScenePreset] = {
    "standard": ScenePreset(
        colours=tuple(sorted(COLOURS)),
        shapes=SHAPES,
        positions=tuple(sorted(POSITIONS)),
        max_count=4,
        letter_rate=0.4,
        radius=0.18,
        plain_background=False,
        questions=("colour", "shape", "count", "position", "letter", "yes_no"),
        sizes=DEFAULT_SIZES,
    ),
    # One large shape on white in the centre: colours and shapes far apart, nothing else in the picture.
    "easy": ScenePreset(
        colours=("black", "blue", "green", "purple", "red", "yellow"),
        shapes=("circle", "cross", "square", "triangle"),
        positions=("centre",),
        max_count=1,
        letter_rate=0.0,
        radius=0.4,
        plain_background=True,
        questions=("colour", "shape", "yes_no"),
        sizes=((32, 32), (64, 32), (32, 64), (64, 64)),
    ),
}


def get_preset(name: str) -> ScenePreset:
    """The scene preset called `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown scene preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]


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
    preset: str = "standard"

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


def _background(colour: str, preset: ScenePreset) -> tuple[int, int, int]:
    if preset.plain_background:
        return WHITE
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


def generate_scene(
    rng: random.Random | int | str, width: int = 64, height: int = 64, preset: str = "standard"
) -> tuple[Image.Image, SceneFacts]:
    """A `width` x `height` RGB scene of `preset` drawn from `rng` (a `random.Random` or a seed), and its facts."""
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    spec = get_preset(preset)
    shape, colour = rng.choice(spec.shapes), rng.choice(spec.colours)
    count = rng.randint(1, spec.max_count)
    letter = rng.choice(LETTERS) if rng.random() < spec.letter_rate else None
    image = Image.new("RGB", (width, height), _background(colour, spec))
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    if count == 1:
        position = rng.choice(spec.positions)
        fx, fy = POSITIONS[position]
        centres = [(fx * width, fy * height)]
        radius = side * spec.radius
    else:
        position = None
        cells = [(col, row) for row in range(2) for col in range(2)]
        rng.shuffle(cells)
        centres = [((col + 0.5) * width / 2, (row + 0.5) * height / 2) for col, row in cells[:count]]
        radius = side * 0.16
    for cx, cy in centres:
        _draw_shape(draw, shape, cx, cy, radius, COLOURS[colour])
    if letter:
        ink = (255, 255, 255) if sum(_background(colour, spec)) < 300 else (0, 0, 0)
        draw.text((1, 0), letter, fill=ink, font=ImageFont.load_default(size=max(8, side // 4)))
    return image, SceneFacts(shape, colour, count, position, letter, width, height, preset)


def scene_questions(facts: SceneFacts, rng: random.Random | int = 0) -> list[tuple[str, str]]:
    """Questions about the scene (of the kinds its preset asks) with their single-word answers."""
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    spec = get_preset(facts.preset)
    pairs = []
    for kind in spec.questions:
        if kind == "colour":
            pairs.append((f"What colour is the shape? {SINGLE_WORD}", facts.colour))
        elif kind == "shape":
            pairs.append((f"What shape is in the image? {SINGLE_WORD}", facts.shape))
        elif kind == "count":
            pairs.append((f"How many shapes are there? {SINGLE_WORD}", NUMBER_WORDS[facts.count]))
        elif kind == "position" and facts.position is not None:
            pairs.append((f"Where is the shape? {SINGLE_WORD}", facts.position))
        elif kind == "letter" and facts.letter is not None:
            pairs.append((f"Which letter is in the image? {SINGLE_WORD}", facts.letter))
        elif kind == "yes_no":
            others = sorted(set(spec.colours) - {facts.colour})
            asked = facts.colour if rng.random() < 0.5 else rng.choice(others)
            answer = "yes" if asked == facts.colour else "no"
            pairs.append((f"Is there a {asked} {facts.shape}? {SINGLE_WORD}", answer))
    return pairs
