"""Seeded synthetic scenes: one or a few identical shapes of one colour, at a named position, maybe with a letter.

`generate_scene` returns the image with its ground-truth `SceneFacts`; `scene_questions` turns the facts into
questions whose answers are single words of the tiny tokenizer's vocabulary (colours, shapes, positions, number
words, letters A-E, yes / no), so that an evaluation can score exact matches. A preset (`PRESETS`) says what the
scenes may hold and what is asked about them: `standard` varies everything, `easy` draws one large shape on white,
asked only what a tiny model learns from a few hundred steps. `detail` draws the easy preset's large shape plus two
small details (a marker and a letter) whose kind, colour, place, size and rendering come from a generator of their own
(`detail_rng`), so the same coarse scene can be drawn with other details: the positive pairs of the tiny tower's
invariance pretraining (`training.tower_pretraining`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
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
QUESTION_KINDS = ("colour", "shape", "count", "position", "letter", "yes_no", "marker_colour", "marker_position")
# Kinds that ask about the scene's large shape; the others ask about small details.
COARSE_KINDS = ("colour", "shape", "count", "position", "yes_no")
# Where a detail preset's marker sits: the middle of an edge (fractions of width and height), clear of the large shape.
MARKER_POSITIONS = {"left": (0.09, 0.5), "right": (0.91, 0.5), "top": (0.5, 0.09), "bottom": (0.5, 0.91)}
# Where its letter sits: a corner, as the fraction of the free space left of / above the glyph.
LETTER_CORNERS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
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
    # A small marker (dot or square) of one of these colours at an edge, and a small letter in a corner, always both;
    # () draws neither. Sizes are (min, max) fractions of the shorter side, drawn per scene.
    marker_colours: tuple[str, ...] = ()
    marker_radius: tuple[float, float] = (0.06, 0.09)
    letter_size: tuple[float, float] = (0.22, 0.3)
    noise: float = 0.0  # the standard deviation of Gaussian pixel noise (0..255 scale) on a detail preset's scenes

    def __post_init__(self) -> None:
        for name, chosen, known in (
            ("colours", self.colours, COLOURS),
            ("shapes", self.shapes, SHAPES),
            ("positions", self.positions, POSITIONS),
            ("questions", self.questions, QUESTION_KINDS),
        ):
            if not chosen or set(chosen) - set(known):
                raise ValueError(f"preset {name} {chosen}: expected some of {tuple(known)}")
        if set(self.marker_colours) - set(COLOURS):
            raise ValueError(f"preset marker_colours {self.marker_colours}: expected some of {tuple(COLOURS)}")
        details = {"marker_colour", "marker_position"} & set(self.questions)
        if details and not self.marker_colours:
            raise ValueError(f"preset asks {sorted(details)} but draws no marker: give it marker_colours")
        if self.marker_colours and self.max_count != 1:
            raise ValueError("a preset with details draws one large shape (max_count 1): the edges must stay clear")
        if self.plain_background and "white" in self.colours + self.marker_colours:
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
    # The easy preset's large shape (smaller: the edges stay clear) and two details, always both: a marker dot or square
    # at an edge and a letter A-E in a corner, each of varying size. At 64 px the marker is 4-6 px wide, the letter
    # 14-19 px tall; the tower sees them at half that without the grid, at full size in the grid's crops.
    "detail": ScenePreset(
        colours=("black", "blue", "green", "purple", "red", "yellow"),
        shapes=("circle", "cross", "square", "triangle"),
        positions=("centre",),
        max_count=1,
        letter_rate=0.0,  # the letter is a detail, drawn with the marker
        radius=0.27,
        plain_background=True,
        questions=("colour", "shape", "marker_colour", "marker_position", "letter"),
        sizes=((64, 64),),
        marker_colours=("blue", "green", "red", "yellow"),
        noise=16.0,
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
    marker_colour: str | None = None  # set when the preset draws details
    marker_position: str | None = None

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
        if self.marker_colour:
            text += f" A small {self.marker_colour} dot is at the {self.marker_position}."
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


def _draw_details(
    draw: ImageDraw.ImageDraw, rng: random.Random, spec: ScenePreset, width: int, height: int
) -> tuple[str, str, str]:
    """Draw a detail preset's marker and letter from `rng`; return (marker colour, marker position, letter)."""
    side = min(width, height)
    colour, position = rng.choice(spec.marker_colours), rng.choice(sorted(MARKER_POSITIONS))
    fx, fy = MARKER_POSITIONS[position]
    jitter = 0.06 * side  # along the edge and inwards, so a marker's place is a region, not a pixel
    cx = fx * width + (rng.uniform(-jitter, jitter) if position in ("top", "bottom") else 0)
    cy = fy * height + (rng.uniform(-jitter, jitter) if position in ("left", "right") else 0)
    r = max(1.0, side * rng.uniform(*spec.marker_radius))
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=COLOURS[colour])
    letter = rng.choice(LETTERS)
    font = ImageFont.load_default(size=max(6, round(side * rng.uniform(*spec.letter_size))))
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    fx, fy = rng.choice(LETTER_CORNERS)
    ink = (0, 0, 0) if rng.random() < 0.5 else (90, 90, 90)
    draw.text(
        (fx * (width - right) - left * (1 - fx), fy * (height - bottom) - top * (1 - fy)), letter, fill=ink, font=font
    )
    return colour, position, letter


def _detail_scene(
    rng: random.Random, detail_rng: random.Random, width: int, height: int, preset: str
) -> tuple[Image.Image, SceneFacts]:
    """A detail preset's scene: the large shape from `rng`, with nuisance variation of its own (place, size, shade,
    background: a coarse scene is not one of a few exact images, so a layer's leftover trace of a detail is not
    trivially readable), then the details from `detail_rng`."""
    spec = get_preset(preset)
    shape, colour = rng.choice(spec.shapes), rng.choice(spec.colours)
    side = min(width, height)
    grey = rng.randint(215, 255)
    image = Image.new("RGB", (width, height), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    shift = 0.06 * side
    cx, cy = width / 2 + rng.uniform(-shift, shift), height / 2 + rng.uniform(-shift, shift)
    radius = side * spec.radius * rng.uniform(0.8, 1.15)
    fill = tuple(min(255, max(0, channel + rng.randint(-30, 30))) for channel in COLOURS[colour])
    _draw_shape(draw, shape, cx, cy, radius, fill)
    marker_colour, marker_position, letter = _draw_details(draw, detail_rng, spec, width, height)
    if spec.noise:  # sensor-like noise, part of the coarse scene (both views of a pair share it)
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, spec.noise, (height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    facts = SceneFacts(shape, colour, 1, "centre", letter, width, height, preset, marker_colour, marker_position)
    return image, facts


def generate_scene(
    rng: random.Random | int | str,
    width: int = 64,
    height: int = 64,
    preset: str = "standard",
    detail_rng: random.Random | int | str | None = None,
) -> tuple[Image.Image, SceneFacts]:
    """A `width` x `height` RGB scene of `preset` drawn from `rng` (a `random.Random` or a seed), and its facts.

    A preset with details draws them from `detail_rng` (default: `rng`, after the large shape): the same `rng` with
    another `detail_rng` is the same coarse scene with other details."""
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    spec = get_preset(preset)
    if spec.marker_colours:
        detail_rng = (
            detail_rng if detail_rng is None or isinstance(detail_rng, random.Random) else random.Random(detail_rng)
        )
        return _detail_scene(rng, detail_rng or rng, width, height, preset)
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


def kinded_questions(facts: SceneFacts, rng: random.Random | int = 0) -> list[tuple[str, str, str]]:
    """(kind, question, single-word answer) for each kind of question the scene's preset asks that applies to it."""
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    spec = get_preset(facts.preset)
    asked = []
    for kind in spec.questions:
        if kind == "colour":
            asked.append((kind, f"What colour is the shape? {SINGLE_WORD}", facts.colour))
        elif kind == "shape":
            asked.append((kind, f"What shape is in the image? {SINGLE_WORD}", facts.shape))
        elif kind == "count":
            asked.append((kind, f"How many shapes are there? {SINGLE_WORD}", NUMBER_WORDS[facts.count]))
        elif kind == "position" and facts.position is not None:
            asked.append((kind, f"Where is the shape? {SINGLE_WORD}", facts.position))
        elif kind == "letter" and facts.letter is not None:
            asked.append((kind, f"Which letter is in the image? {SINGLE_WORD}", facts.letter))
        elif kind == "yes_no":
            others = sorted(set(spec.colours) - {facts.colour})
            colour = facts.colour if rng.random() < 0.5 else rng.choice(others)
            answer = "yes" if colour == facts.colour else "no"
            asked.append((kind, f"Is there a {colour} {facts.shape}? {SINGLE_WORD}", answer))
        elif kind == "marker_colour" and facts.marker_colour is not None:
            asked.append((kind, f"What colour is the small dot? {SINGLE_WORD}", facts.marker_colour))
        elif kind == "marker_position" and facts.marker_position is not None:
            asked.append((kind, f"Where is the small dot? {SINGLE_WORD}", facts.marker_position))
    return asked


def scene_questions(facts: SceneFacts, rng: random.Random | int = 0) -> list[tuple[str, str]]:
    """Questions about the scene (of the kinds its preset asks) with their single-word answers."""
    return [(question, answer) for _, question, answer in kinded_questions(facts, rng)]
