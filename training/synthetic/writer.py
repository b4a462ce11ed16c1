"""Write the embedded default dataset: synthetic scenes in LLaVA format, with mixture YAMLs for each stage.

```
DIR/images/scene_0000.png ...   several sizes and aspect ratios, so AnyRes grids differ per image
DIR/captions.json               stage 1: "<image>" + caption (also stage 1.5's detailed-description data)
DIR/qa.json                     single-image question/answer conversations, 1-3 turns
DIR/multi.json                  two-image questions
DIR/text.jsonl                  text-only questions (jsonl)
DIR/stage1.yaml, stage1.5.yaml, stage2.yaml   mixtures over the files above
```
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from .scenes import COLOURS, NUMBER_WORDS, SHAPES, SINGLE_WORD, generate_scene, get_preset, scene_questions

SIDES = {"triangle": 3, "square": 4, "rectangle": 4, "diamond": 4}


def _text_only_records(rng: random.Random, count: int) -> list[dict]:
    letters = "ABCDE"
    records = []
    for index in range(count):
        kind = index % 3
        if kind == 0:
            word = rng.choice(sorted(COLOURS) + list(SHAPES))
            question, answer = f"Is {word} a colour? {SINGLE_WORD}", "yes" if word in COLOURS else "no"
        elif kind == 1:
            shape = rng.choice(sorted(SIDES))
            question, answer = f"How many sides does a {shape} have? {SINGLE_WORD}", NUMBER_WORDS[SIDES[shape]]
        else:
            position = rng.randrange(len(letters) - 1)
            question, answer = f"Which letter comes after {letters[position]}? {SINGLE_WORD}", letters[position + 1]
        records.append({"id": f"text-{index:04d}", "conversations": _turns([(question, answer)])})
    return records


def _turns(pairs: list[tuple[str, str]], images: int = 0) -> list[dict]:
    turns = []
    for number, (question, answer) in enumerate(pairs):
        prefix = "<image>\n" * images if number == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return turns


def write_synthetic(
    directory: str | Path,
    seed: int = 0,
    num_scenes: int = 48,
    sizes: tuple[tuple[int, int], ...] | None = None,
    preset: str = "standard",
) -> dict[str, Path]:
    """Write the synthetic dataset of scene `preset` (at its sizes unless `sizes` are given) to `directory`; return
    the paths of its data files and mixtures."""
    directory = Path(directory)
    sizes = sizes or get_preset(preset).sizes
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = []
    for index in range(num_scenes):
        width, height = sizes[index % len(sizes)]
        image, facts = generate_scene(rng, width, height, preset)
        name = f"images/scene_{index:04d}.png"
        image.save(directory / name)
        scenes.append((name, facts))

    captions = [
        {
            "id": f"caption-{index:04d}",
            "image": name,
            "conversations": _turns([("Describe the image.", facts.caption())], images=1),
        }
        for index, (name, facts) in enumerate(scenes)
    ]
    qa = []
    for index, (name, facts) in enumerate(scenes):
        pairs = scene_questions(facts, rng)
        rng.shuffle(pairs)
        qa.append(
            {"id": f"qa-{index:04d}", "image": name, "conversations": _turns(pairs[: rng.randint(1, 3)], images=1)}
        )
    multi = []
    for index in range(max(1, num_scenes // 4)):
        (first, a), (second, b) = rng.sample(scenes, 2)
        question = f"How many shapes are there? {SINGLE_WORD}"
        multi.append(
            {
                "id": f"multi-{index:04d}",
                "image": [first, second],
                "conversations": _turns([(question, NUMBER_WORDS[a.count + b.count])], images=2),
            }
        )
    text = _text_only_records(rng, max(1, num_scenes // 3))

    paths = {name: directory / name for name in ("captions.json", "qa.json", "multi.json", "text.jsonl")}
    paths["captions.json"].write_text(json.dumps(captions, indent=1))
    paths["qa.json"].write_text(json.dumps(qa, indent=1))
    paths["multi.json"].write_text(json.dumps(multi, indent=1))
    paths["text.jsonl"].write_text("".join(json.dumps(record) + "\n" for record in text))
    mixtures = {
        "stage1.yaml": [("captions.json", "all")],
        "stage1.5.yaml": [("captions.json", "all"), ("qa.json", "first:50%"), ("text.jsonl", "first:50%")],
        "stage2.yaml": [("qa.json", "all"), ("multi.json", "all"), ("text.jsonl", "all")],
    }
    for name, entries in mixtures.items():
        spec = {"datasets": [{"json_path": path, "sampling_strategy": how} for path, how in entries]}
        (directory / name).write_text(yaml.safe_dump(spec, sort_keys=False))
        paths[name] = directory / name
    paths["images"] = directory / "images"
    return paths
