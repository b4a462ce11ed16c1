"""The synthetic dataset: seeded, valid LLaVA data for every stage, with ground truth the pixels agree with."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from PIL import Image
from transformers import AutoProcessor

from llava_integration.tiny import CORPUS_WORDS
from training.data import get_template, read_data, validate_data
from training.model_setup import configure_processor
from training.recipe import load_recipe
from training.synthetic import COLOURS, POSITIONS, generate_scene, get_preset, scene_questions
from training.synthetic.__main__ import main as synthetic_main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    synthetic_main([str(directory), "--seed", "7", "--num_scenes", "24"])
    return directory


def test_same_seed_same_bytes_other_seed_other_data(dataset, tmp_path):
    synthetic_main([str(tmp_path / "again"), "--seed", "7", "--num_scenes", "24"])
    synthetic_main([str(tmp_path / "other"), "--seed", "8", "--num_scenes", "24"])
    for name in ("captions.json", "qa.json", "multi.json", "text.jsonl", "images/scene_0003.png"):
        assert (tmp_path / "again" / name).read_bytes() == (dataset / name).read_bytes()
    assert (tmp_path / "other" / "qa.json").read_text() != (dataset / "qa.json").read_text()


def test_every_stage_mixture_is_valid_and_holds_text_only_multi_image_and_several_shapes(dataset, tiny_dir):
    for stage, recipe_name in (("stage1", "stage1"), ("stage1.5", "stage1.5"), ("stage2", "stage2")):
        recipe = load_recipe(recipe_name)
        processor = AutoProcessor.from_pretrained(tiny_dir)
        configure_processor(processor, recipe, recipe.image_aspect_ratio)
        records = read_data(dataset / f"{stage}.yaml")
        checked = validate_data(
            records,
            template=get_template(recipe.template),
            processor=processor,
            image_folder=dataset,
            image_aspect_ratio=recipe.image_aspect_ratio,
            max_length=2048,
        )
        assert len(checked.records) == len(records) > 0
    stage2 = read_data(dataset / "stage2.yaml")
    assert any(not r.images for r in stage2) and any(len(r.images) == 2 for r in stage2)
    shapes = {Image.open(path).size for path in (dataset / "images").glob("*.png")}
    assert len({w / h for w, h in shapes}) >= 3 and max(max(s) for s in shapes) > 32  # grids of several layouts


def test_answers_are_single_words_of_the_tiny_vocabulary(dataset):
    vocabulary = set(CORPUS_WORDS.split())
    records = json.loads((dataset / "qa.json").read_text()) + json.loads((dataset / "multi.json").read_text())
    records += [json.loads(line) for line in (dataset / "text.jsonl").read_text().splitlines()]
    answers = [turn["value"] for r in records for turn in r["conversations"] if turn["from"] == "gpt"]
    assert answers and all(answer in vocabulary for answer in answers), set(answers) - vocabulary


def test_scene_facts_agree_with_the_pixels():
    """Independent check of the ground truth: a single filled shape has its colour at its named position."""
    filled = {"circle", "square", "triangle", "star", "cross", "diamond", "rectangle", "ellipse"}
    checked = 0
    rng = random.Random(0)
    for _ in range(200):
        image, facts = generate_scene(rng, 96, 64)
        assert facts.count >= 1 and (facts.position is None) == (facts.count > 1)
        if facts.count == 1 and facts.shape in filled and facts.letter is None:
            fx, fy = POSITIONS[facts.position]
            assert image.getpixel((int(fx * 96), int(fy * 64))) == COLOURS[facts.colour], facts
            checked += 1
        questions = dict(scene_questions(facts, rng))
        assert questions["What colour is the shape? Answer with a single word."] == facts.colour
    assert checked > 20


def test_easy_preset_draws_one_large_centred_shape_on_white_and_asks_only_its_kinds(tmp_path):
    easy = get_preset("easy")
    rng = random.Random(1)
    for _ in range(100):
        width, height = rng.choice(easy.sizes)
        image, facts = generate_scene(rng, width, height, "easy")
        assert (facts.count, facts.position, facts.letter, facts.preset) == (1, "centre", None, "easy")
        assert facts.shape in easy.shapes and facts.colour in easy.colours
        assert image.getpixel((width // 2, height // 2)) == COLOURS[facts.colour], facts  # every easy shape is filled
        assert image.getpixel((0, 0)) == image.getpixel((width - 1, height - 1)) == (255, 255, 255)
        questions = dict(scene_questions(facts, rng))
        assert len(questions) == len(easy.questions) == 3
        yes_no = [question for question in questions if question.startswith("Is there")]
        assert len(yes_no) == 1 and yes_no[0].split()[3] in easy.colours
    synthetic_main([str(tmp_path), "--num_scenes", "6", "--preset", "easy"])
    answers = {turn["value"] for r in json.loads((tmp_path / "qa.json").read_text()) for turn in r["conversations"]}
    assert "centre" not in answers and not answers & {"one", "two", "three", "four"}


def test_presets_refuse_what_they_cannot_draw():
    with pytest.raises(ValueError, match="unknown scene preset 'hard'"):
        get_preset("hard")
    standard = get_preset("standard")
    with pytest.raises(ValueError, match="plain white background"):
        replace(standard, plain_background=True)
    with pytest.raises(ValueError, match="shapes"):
        replace(standard, shapes=("hexagon",))
    with pytest.raises(ValueError, match="max_count 5"):
        replace(standard, max_count=5)
