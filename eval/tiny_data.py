"""The `manager_tiny` documents: held-out scenes of the training data's own generator, each asked one of its questions.

Scenes, questions and answers come from `training.synthetic` (`generate_scene`, `scene_questions`, a preset's
sizes), so the tiny models are asked what they were trained on: images of the same distribution, the same phrasing (the
prompt is the question alone, in the chat template) and the same one-word answers. Scene seeds are strings
(`manager_tiny:<seed>:<index>`), never one of the integer seeds `write_synthetic` draws its scenes from: evaluated
scenes are drawn independently of the training scenes. Documents hold the scene's seed and size, not pixels;
`render` redraws the image, so a task of any size is built in memory in milliseconds, offline.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from training.synthetic import LETTERS, MARKER_POSITIONS, NUMBER_WORDS, generate_scene, get_preset, kinded_questions

NUM_CHOICES = 4  # at most: a yes/no question has two
# The tasks' YAML files: their `dataset_kwargs` are `generate_documents`' arguments.
TASK_DIR = Path(__file__).resolve().parent / "tasks" / "manager_tiny"
# The generated tasks and the metric each is scored by: `manager_tiny*` on the `easy` scenes, `manager_tiny_detail*` on
# the `detail` scenes (coarse and detail questions).
TASK_METRICS = {
    "manager_tiny": "exact_match",
    "manager_tiny_mc": "acc",
    "manager_tiny_detail": "exact_match",
    "manager_tiny_detail_mc": "acc",
}


def scene_seed(seed: int, index: int) -> str:
    """The seed of document `index`'s scene (a string: disjoint from the training data's integer seeds)."""
    return f"manager_tiny:{seed}:{index}"


def answer_vocabularies(preset: str = "standard") -> dict[str, tuple[str, ...]]:
    """The answer words of each kind of question scenes of `preset` are asked: a multiple-choice document offers its
    answer and other words of its kind."""
    spec = get_preset(preset)
    words = {
        "colour": tuple(sorted(spec.colours)),
        "shape": spec.shapes,
        "count": NUMBER_WORDS[1 : spec.max_count + 1],
        "position": tuple(sorted(spec.positions)),
        "letter": LETTERS,
        "yes_no": ("yes", "no"),
        "marker_colour": tuple(sorted(spec.marker_colours)),
        "marker_position": tuple(sorted(MARKER_POSITIONS)),
    }
    return {kind: words[kind] for kind in spec.questions}


def generate_documents(num_docs: int = 200, seed: int = 0, preset: str = "standard") -> list[dict[str, Any]]:
    """`num_docs` documents: a held-out scene of `preset`, one of its questions (drawn like the training data's), the
    answer and up to `NUM_CHOICES` choices of the answer's kind."""
    if num_docs < 1:
        raise ValueError(f"num_docs must be a positive int, got {num_docs!r}")
    vocabularies = answer_vocabularies(preset)
    rng = random.Random(f"manager_tiny:{seed}")
    documents = []
    for index in range(num_docs):
        width, height = rng.choice(get_preset(preset).sizes)
        _, facts = generate_scene(random.Random(scene_seed(seed, index)), width, height, preset)
        kind, question, answer = rng.choice(kinded_questions(facts, rng))
        vocabulary = vocabularies[kind]
        others = rng.sample([word for word in vocabulary if word != answer], min(NUM_CHOICES, len(vocabulary)) - 1)
        choices = [answer, *others]
        rng.shuffle(choices)
        documents.append(
            {
                "question_id": index,
                "scene_seed": scene_seed(seed, index),
                "preset": preset,
                "width": width,
                "height": height,
                "kind": kind,
                "question": question,
                "answer": answer,
                "choices": choices,
                "answer_index": choices.index(answer),
            }
        )
    return documents


def render(document: dict[str, Any]) -> Image.Image:
    """The RGB image of a document's scene, redrawn from its seed and size."""
    scene_rng = random.Random(document["scene_seed"])
    return generate_scene(scene_rng, document["width"], document["height"], document["preset"])[0]


def chance_scores(documents: list[dict[str, Any]]) -> dict[str, float]:
    """What a model blind to the images scores on average: exact match guessing a word of the answer's kind, and
    multiple choice guessing one of the choices (every kind's answers are equally likely by construction)."""
    vocabulary_sizes = [len(answer_vocabularies(document["preset"])[document["kind"]]) for document in documents]
    return {
        "exact_match": sum(1 / size for size in vocabulary_sizes) / len(documents),
        "multiple_choice": sum(1 / len(document["choices"]) for document in documents) / len(documents),
    }


class _TaskConfigLoader(yaml.SafeLoader):
    """Reads lmms-eval task YAML: its `!function module.name` tags stay strings."""


_TaskConfigLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def task_config(task: str) -> dict[str, Any]:
    """A generated task's YAML with its includes resolved as lmms-eval resolves them (the first include wins)."""
    if task not in TASK_METRICS:
        raise ValueError(f"unknown generated task {task!r}: expected one of {sorted(TASK_METRICS)}")
    return _load_config(TASK_DIR / f"{task}.yaml")


def _load_config(path: Path) -> dict[str, Any]:
    config = yaml.load(path.read_text(), Loader=_TaskConfigLoader)  # a SafeLoader that knows !function
    includes = config.pop("include", [])
    merged: dict[str, Any] = {}
    for name in reversed([includes] if isinstance(includes, str) else includes):
        merged.update(_load_config(path.parent / name))
    return {**merged, **config}


def shipped_documents(limit: int | None = None, task: str = "manager_tiny") -> list[dict[str, Any]]:
    """The documents the generated task `task` evaluates (the first `limit` of them, as `--limit` takes)."""
    return generate_documents(**task_config(task)["dataset_kwargs"])[:limit]
