"""The `manager_tiny` documents: one coloured shape at a named position per image, asked about in one word.

Documents hold the scene's description, not pixels; `render` draws the image from it, so a task of any size is built
in memory in milliseconds, offline, and the same seed always gives the same documents and images. Every answer is a
single word of the tiny tokenizer's vocabulary (`llava_integration.tiny.CORPUS_WORDS`).
"""

from __future__ import annotations

import math
import random
from typing import Any

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (130, 50, 170),
    "orange": (245, 140, 20),
    "pink": (240, 130, 190),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
# Where the shape's centre sits, as fractions of the image's width and height.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
QUESTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "colour": ("What colour is the shape?", tuple(COLOURS)),
    "shape": ("What shape is in the image?", SHAPES),
    "position": ("Where is the shape?", tuple(POSITIONS)),
}
SIDES = (32, 48, 64, 96)  # image sides in pixels: from one 32 px crop to AnyRes grids of several crops
NUM_CHOICES = 4
BACKGROUND = (255, 255, 255)


def generate_documents(num_docs: int = 60, seed: int = 0) -> list[dict[str, Any]]:
    """`num_docs` documents (question kinds in turn), each with its scene, question, answer and four choices."""
    if num_docs < 1:
        raise ValueError(f"num_docs must be a positive int, got {num_docs!r}")
    rng = random.Random(seed)
    kinds = list(QUESTIONS)
    documents = []
    for index in range(num_docs):
        scene = {
            "colour": rng.choice(list(COLOURS)),
            "shape": rng.choice(SHAPES),
            "position": rng.choice(list(POSITIONS)),
            "width": rng.choice(SIDES),
            "height": rng.choice(SIDES),
        }
        kind = kinds[index % len(kinds)]
        question, vocabulary = QUESTIONS[kind]
        answer = scene[kind]
        choices = [answer, *rng.sample([word for word in vocabulary if word != answer], NUM_CHOICES - 1)]
        rng.shuffle(choices)
        documents.append(
            {
                "question_id": index,
                "kind": kind,
                "question": question,
                "answer": answer,
                "choices": choices,
                "answer_index": choices.index(answer),
                **scene,
            }
        )
    return documents


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":  # ten corners, alternating between the outer radius and an inner one
        radii = [r if k % 2 == 0 else r / 2.5 for k in range(10)]
        return [
            (cx + radius * math.sin(k * math.pi / 5), cy - radius * math.cos(k * math.pi / 5))
            for k, radius in enumerate(radii)
        ]
    raise ValueError(f"{shape!r} is not a polygon shape")


def render(document: dict[str, Any]) -> Image.Image:
    """The RGB image a document describes: its shape, in its colour, centred at its position, on white."""
    width, height = document["width"], document["height"]
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[document["position"]]
    cx, cy, r = fx * width, fy * height, min(width, height) / 5
    fill = COLOURS[document["colour"]]
    shape = document["shape"]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=fill)
        draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return image
