"""Synthetic tiny datasets, one per task, in both supported formats, so every recipe runs offline.

Each image is one coloured shape at a position; the texts speak about it, so the tasks are learnable. The
generator writes `{task}_{split}.arrow` (ViLT-style tables, as the reference's `write_*.py`) and
`{task}_{split}.json` plus an `images/` folder, for splits `train` and `eval`.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image, ImageDraw

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "centre")
# SNLI-VE label ids of the reference's write_snli.py.
CONTRADICTION, NEUTRAL, ENTAILMENT = 0, 1, 2
_RGB = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}


def draw_shape(colour: str, shape: str, position: str, size: int = 64) -> bytes:
    """A PNG of one `colour` `shape` at `position` on a grey background."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    centre_x = {"left": size // 4, "centre": size // 2, "right": 3 * size // 4}[position]
    radius, centre_y = size // 6, size // 2
    box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=_RGB[colour])
    elif shape == "square":
        draw.rectangle(box, fill=_RGB[colour])
    else:
        draw.polygon([(centre_x, box[1]), (box[0], box[3]), (box[2], box[3])], fill=_RGB[colour])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _scene(rng: random.Random) -> dict[str, Any]:
    colour, shape, position = rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(POSITIONS)
    return {"colour": colour, "shape": shape, "position": position, "png": draw_shape(colour, shape, position)}


def _other_colour(rng: random.Random, colour: str) -> str:
    return rng.choice([other for other in COLOURS if other != colour])


# Each builder turns scenes into (arrow columns, json records); json records name images by scene index.
def _captions(scenes: list[dict[str, Any]], rng: random.Random) -> tuple[dict[str, list], list[dict]]:
    captions = [
        [f"a {s['colour']} {s['shape']} on the {s['position']}", f"the image shows a {s['colour']} {s['shape']}"]
        for s in scenes
    ]
    columns = {
        "image": [s["png"] for s in scenes],
        "caption": captions,
        "image_id": list(range(len(scenes))),
        "split": ["synthetic"] * len(scenes),
    }
    records = [{"image": i, "text": text, "image_id": i} for i, texts in enumerate(captions) for text in texts]
    return columns, records


def _vqa(scenes: list[dict[str, Any]], rng: random.Random) -> tuple[dict[str, list], list[dict]]:
    questions = [["what colour is the shape?", f"what colour is the {s['shape']}?"] for s in scenes]
    labels = [[[COLOURS.index(s["colour"])]] * 2 for s in scenes]
    question_ids = [[2 * i, 2 * i + 1] for i in range(len(scenes))]
    columns = {
        "image": [s["png"] for s in scenes],
        "questions": questions,
        "answers": [[[s["colour"]]] * 2 for s in scenes],
        "answer_labels": labels,
        "answer_scores": [[[1.0]] * 2 for _ in scenes],
        "image_id": list(range(len(scenes))),
        "question_id": question_ids,
        "split": ["synthetic"] * len(scenes),
    }
    records = [
        {"image": i, "text": text, "labels": labels[i][j], "scores": [1.0], "question_id": question_ids[i][j]}
        for i in range(len(scenes))
        for j, text in enumerate(questions[i])
    ]
    return columns, records


def _snli(scenes: list[dict[str, Any]], rng: random.Random) -> tuple[dict[str, list], list[dict]]:
    sentences, labels = [], []
    for s in scenes:
        premise = f"a {s['colour']} {s['shape']}"
        pairs = [
            ([premise, f"the shape is {s['colour']}"], ENTAILMENT),
            ([premise, f"the shape is {_other_colour(rng, s['colour'])}"], CONTRADICTION),
            ([premise, "the shape is big"], NEUTRAL),
        ]
        sentences.append([pair for pair, _ in pairs])
        labels.append([label for _, label in pairs])
    columns = {"image": [s["png"] for s in scenes], "sentences": sentences, "labels": labels}
    records = [
        {"image": i, "text": pair[1], "label": label}
        for i in range(len(scenes))
        for pair, label in zip(sentences[i], labels[i])
    ]
    return columns, records


def _nlvr2(scenes: list[dict[str, Any]], rng: random.Random) -> tuple[dict[str, list], list[dict]]:
    pairs = [(scenes[i], scenes[(i + 1) % len(scenes)]) for i in range(len(scenes))]
    questions = [
        [
            f"the left image has a {left['colour']} shape",
            f"the left image has a {_other_colour(rng, left['colour'])} shape",
        ]
        for left, _ in pairs
    ]
    columns = {
        "image_0": [left["png"] for left, _ in pairs],
        "image_1": [right["png"] for _, right in pairs],
        "questions": questions,
        "answers": [["True", "False"] for _ in pairs],
        "identifier": [f"synthetic-{i}" for i in range(len(pairs))],
    }
    records = [
        {"images": [i, (i + 1) % len(scenes)], "text": text, "label": int(j == 0)}
        for i in range(len(pairs))
        for j, text in enumerate(questions[i])
    ]
    return columns, records


BUILDERS: dict[str, Callable[[list[dict[str, Any]], random.Random], tuple[dict[str, list], list[dict]]]] = {
    "pretrain": _captions,
    "vqav2": _vqa,
    "snli_ve": _snli,
    "nlvr2": _nlvr2,
    "retrieval": _captions,
}
SPLITS = ("train", "eval")


def write_synthetic(task: str, root: str | Path, num_images: int = 8, seed: int = 0) -> Path:
    """Write the synthetic `task` dataset (both splits, both formats) under `root`; return `root`."""
    if task not in BUILDERS:
        raise ValueError(f"no synthetic data for task {task!r}: expected one of {sorted(BUILDERS)}")
    if num_images < 2:
        raise ValueError(f"num_images must be at least 2, got {num_images}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split in SPLITS:
        scenes = [_scene(rng) for _ in range(num_images)]
        columns, records = BUILDERS[task](scenes, rng)
        table = pa.table(columns)
        with (
            pa.OSFile(str(root / f"{task}_{split}.arrow"), "wb") as sink,
            pa.ipc.new_file(sink, table.schema) as writer,
        ):
            writer.write_table(table)
        names = []
        for index, scene in enumerate(scenes):
            names.append(f"images/{task}_{split}_{index}.png")
            (root / names[-1]).write_bytes(scene["png"])
        for record in records:
            if "image" in record:
                record["image"] = names[record["image"]]
            if "images" in record:
                record["images"] = [names[index] for index in record["images"]]
        (root / f"{task}_{split}.json").write_text(json.dumps(records, indent=1))
    return root
