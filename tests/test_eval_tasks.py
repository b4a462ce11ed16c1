"""The task side of evaluation: the generated manager_tiny documents, the 20-task groups, the benchmark table."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from eval import TASKS_DIR
from eval.benchmarks import load_table
from eval.tiny_data import COLOURS, POSITIONS, QUESTIONS, generate_documents, render
from llava_integration.tiny import CORPUS_WORDS

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


def test_documents_are_seeded_and_answer_in_one_vocabulary_word(tiny_processor):
    documents = generate_documents(30, seed=3)
    assert documents == generate_documents(30, seed=3)
    assert documents != generate_documents(30, seed=4)
    vocabulary = set(CORPUS_WORDS.split())
    for document in documents:
        assert document["answer"] == document[document["kind"]]
        assert document["choices"][document["answer_index"]] == document["answer"]
        assert len(set(document["choices"])) == 4
        for word in document["choices"]:
            assert word in vocabulary
            assert len(tiny_processor.tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert {document["kind"] for document in documents} == set(QUESTIONS)


def test_render_draws_the_described_shape_where_it_says():
    for document in generate_documents(24, seed=1):
        pixels = np.asarray(render(document))
        assert pixels.shape == (document["height"], document["width"], 3)
        fx, fy = POSITIONS[document["position"]]
        centre = pixels[int(fy * document["height"]), int(fx * document["width"])]
        assert tuple(centre) == COLOURS[document["colour"]], document
        assert tuple(pixels[0, 0]) == (255, 255, 255)  # every position leaves the corners empty
        coloured = (np.abs(pixels.astype(int) - COLOURS[document["colour"]]).sum(-1) == 0).mean()
        assert 0.02 < coloured < 0.5


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
