"""The task side of evaluation: the generated manager_tiny documents, the 20-task groups, the benchmark table."""

from __future__ import annotations

import functools
import random
import re

import numpy as np
import pytest

from eval import TASKS_DIR
from eval.benchmarks import load_table
from eval.tiny_data import answer_vocabularies, generate_documents, render, shipped_documents
from llava_integration.tiny import CORPUS_WORDS
from training.synthetic import COLOURS, PRESETS, generate_scene, get_preset, scene_questions

# REFERENCE.md section 2, copied by hand: the paper's protocol.
LOCAL13 = [
    "mmmu_val",
    "scienceqa_img",
    "realworldqa",
    "ai2d",
    "chartqa",
    "ok_vqa",
    "textvqa_val",
    "gqa",
    "docvqa_test",
    "infovqa_test",
    "ocrbench",
    "seedbench",
    "vqav2_val",
]
API7 = [
    "mathvista_testmini",
    "mmvet",
    "dc100_en",
    "llava_in_the_wild",
    "llava_wilder_small",
    "live_bench_2407",
    "live_bench_2409",
]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_documents_ask_the_training_questions_with_one_token_answers(tiny_processor, preset):
    documents = generate_documents(200, seed=3, preset=preset)
    vocabularies = answer_vocabularies(preset)
    assert documents == generate_documents(200, seed=3, preset=preset)
    assert documents != generate_documents(200, seed=4, preset=preset)
    assert len({document["scene_seed"] for document in documents}) == 200
    assert {document["kind"] for document in documents} == set(vocabularies) == set(get_preset(preset).questions)
    vocabulary = set(CORPUS_WORDS.split())
    for document in documents:
        scene_rng = random.Random(document["scene_seed"])
        _, facts = generate_scene(scene_rng, document["width"], document["height"], preset)
        asked = re.fullmatch(r"Is there an? (\w+) (\w+)\? Answer with a single word\.", document["question"])
        if asked:  # the training data's yes/no question names a random colour: its answer follows from the facts
            assert asked.group(2) == facts.shape
            assert document["answer"] == ("yes" if asked.group(1) == facts.colour else "no")
        else:  # every other question has one answer per scene
            assert (document["question"], document["answer"]) in scene_questions(facts, 0)
        choices = document["choices"]
        assert choices[document["answer_index"]] == document["answer"] and len(set(choices)) == len(choices)
        assert set(choices) <= set(vocabularies[document["kind"]])
        assert len(choices) == min(4, len(vocabularies[document["kind"]]))
        for word in choices:
            assert word in vocabulary
            assert len(tiny_processor.tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
        assert (document["width"], document["height"]) in get_preset(preset).sizes


def test_shipped_tasks_ask_about_the_scenes_the_tiny_ablation_trains_on():
    from eval.ablation.schedule import load_schedule

    presets = {}
    for name in ("easy", "detail", "smoke"):
        schedule = load_schedule(name)
        asked = {document["preset"] for task in schedule.tasks for document in shipped_documents(task=task)}
        assert asked == {schedule.synthetic["preset"]}, name
        presets[name] = schedule.synthetic["preset"]
    assert presets == {"easy": "easy", "detail": "detail", "smoke": "detail"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_render_draws_the_scene_whose_colour_the_answer_names(preset):
    checked = 0
    for document in generate_documents(120, seed=1, preset=preset):
        image = render(document)
        assert image.size == (document["width"], document["height"])
        assert np.array_equal(np.asarray(image), np.asarray(render(document)))
        if document["kind"] != "colour":
            continue
        spec = get_preset(preset)
        if spec.noise:  # shaded and noisy: the shape's centre is nearest the answer's colour among the preset's
            centre = np.asarray(image, dtype=float)[29:36, 29:36].reshape(-1, 3).mean(axis=0)
            nearest = min(spec.colours, key=lambda name: np.abs(centre - COLOURS[name]).sum())
            assert nearest == document["answer"], document
            checked += 1
            continue
        pixels = np.asarray(image).reshape(-1, 3)
        background = tuple(pixels[-1])  # the bottom-right corner: no shape or letter reaches it
        colours, counts = np.unique(pixels[(pixels != background).any(-1)], axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == COLOURS[document["answer"]], document
        checked += 1
    assert checked > 20


@functools.cache
def shared_task_manager():
    """lmms-eval's task index with this package's tasks, built once per test session (it takes 10-20 s)."""
    from eval.groups import task_manager

    return task_manager()


@pytest.fixture
def lmms_task_manager():
    return shared_task_manager()


def test_groups_resolve_to_the_paper_tasks_in_lmms_eval_0_7_3(lmms_task_manager):
    from importlib.metadata import version

    from eval.groups import describe, protocol_tasks

    assert version("lmms-eval") == "0.7.3"
    assert protocol_tasks(lmms_task_manager, "manager_local13") == LOCAL13
    assert protocol_tasks(lmms_task_manager, "manager_api7") == API7
    assert protocol_tasks(lmms_task_manager, "manager_20") == LOCAL13 + API7
    entries = {name: describe(lmms_task_manager, name) for name in LOCAL13 + API7}
    assert not [name for name, entry in entries.items() if entry.kind == "missing"]
    # In 0.7.3 two of the names are groups: OK-VQA's single split, and MathVista's three prompt variants.
    groups = {name: entry.leaves for name, entry in entries.items() if entry.kind == "group"}
    assert groups == {
        "ok_vqa": ("ok_vqa_val2014",),
        "mathvista_testmini": ("mathvista_testmini_cot", "mathvista_testmini_solution", "mathvista_testmini_format"),
    }
    assert describe(lmms_task_manager, "manager_tiny").kind == "python_task"
    # lmms-eval resolves the detail tasks' includes to the detail scenes and their twins' output types.
    configs = lmms_task_manager.load_task_or_group(["manager_tiny_detail", "manager_tiny_detail_mc"])
    loaded = {task.config.task: task.config for task in configs.values()}
    assert {name: (config.dataset_kwargs["preset"], config.output_type) for name, config in loaded.items()} == {
        "manager_tiny_detail": ("detail", "generate_until"),
        "manager_tiny_detail_mc": ("detail", "multiple_choice"),
    }


def test_benchmark_table_reads_metrics_lmms_eval_0_7_3_reports(lmms_task_manager):
    from lmms_eval import utils

    table = load_table()
    assert [benchmark.task for benchmark in table.protocol()] == [
        "vqav2_val",
        "gqa",
        "mmvet",
        "seedbench",
        "realworldqa",
        "textvqa_val",
        "chartqa",
        "docvqa_test",
        "infovqa_test",
        "ocrbench",
        "ai2d",
        "scienceqa_img",
        "mmmu_val",
        "mathvista_testmini",
        "llava_in_the_wild",
        "ok_vqa",
        "dc100_en",
        "llava_wilder_small",
        "live_bench_2407",
        "live_bench_2409",
    ]
    assert sorted(benchmark.task for benchmark in table.protocol()) == sorted(LOCAL13 + API7)
    assert {benchmark.task for benchmark in table.protocol() if benchmark.judge} == set(API7)
    for benchmark in table.benchmarks:
        config = utils.load_yaml_config(lmms_task_manager.task_index[benchmark.score_task]["yaml_path"], mode="simple")
        assert benchmark.metric in [entry["metric"] for entry in config["metric_list"]], benchmark.task
        filters = [entry["name"] for entry in config.get("filter_list") or []] or ["none"]
        assert benchmark.filter in filters, benchmark.task
    # The paper's numbers (REFERENCE.md): spot checks of both ends of the table.
    by_task = {benchmark.task: benchmark for benchmark in table.benchmarks}
    assert by_task["vqav2_val"].paper == {"baseline": 73.90, "manager": 74.18, "grid": 74.65, "grid_manager": 74.90}
    assert by_task["ocrbench"].paper["grid_manager"] == 577
    assert table.paper_average == {"baseline": 50.54, "manager": 51.50, "grid": 53.87, "grid_manager": 55.21}
    assert {path.name for path in TASKS_DIR.rglob("*.yaml")} >= {"manager_20.yaml", "manager_tiny.yaml"}
