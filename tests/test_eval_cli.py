"""The real lmms-eval CLI on the tiny checkpoint, offline: known scores, the failing-task wrapper, replayed answers.

One CLI run serves every test here (its start-up alone takes ~20 s). Its model answers the same word to every
question and ranks the other words by fixed scores, so the exact-match and multiple-choice accuracies it must get are
computed from the documents alone.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
from lmms_eval.api.instance import Instance
from test_eval_tasks import shared_task_manager
from torch import nn
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from eval import TASKS_DIR
from eval.replay import LoggedPredictions
from eval.run import run
from eval.tiny_data import shipped_documents
from llava_integration import apply_manager, manager_of
from llava_manager.cli import UsageError
from manager_plugin import ManagerConfig

LIMIT = 12  # documents per task: few, but every question kind several times
UNSCORED_TASK = """
task: manager_tiny_unscored
class: !function eval.tiny_task.GeneratedTask
dataset_kwargs: {num_docs: 4, seed: 0}
test_split: test
doc_to_visual: !function eval.tiny_task.doc_to_visual
doc_to_text: "{{question}}"
doc_to_target: answer
output_type: generate_until
generation_kwargs: {max_new_tokens: 2}
metric_list:
  - metric: exact_match
    aggregation: !function unscored.no_score
    higher_is_better: true
"""


def forced_answer_model(tiny_dir, answer: str, seed: int = 0):
    """The tiny model (+ a non-zero manager) rewired so that greedy decoding after any chat prompt says `answer`.

    Every decoder layer's attention and MLP output projections are zeroed, so the last position's hidden state is its
    token's embedding. The prompt's last token ("\\n" after "assistant") embeds as e0 and `answer` as e1; the untied
    output head maps e0 to `answer` (logit 2 * sqrt(D)) above every other token (distinct logits within +-0.5 *
    sqrt(D)), and e1 to <|im_end|>. Returns the model, its processor and each token's e0 score.
    """
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    apply_manager(model, ManagerConfig())
    tokenizer = processor.tokenizer
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "What colour is the shape?"}]}],
        add_generation_prompt=True,
    )
    prompt_end = tokenizer(prompt)["input_ids"][-1]
    (answer_id,) = tokenizer(answer, add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vocab, width = model.lm_head.weight.shape
    generator = torch.Generator().manual_seed(seed)
    scores = torch.linspace(-0.5, 0.5, vocab)[torch.randperm(vocab, generator=generator)]
    scores[answer_id] = 2.0
    head = torch.zeros(vocab, width)
    head[:, 0] = scores
    head[end_id, 1] = 2.0
    with torch.no_grad():
        for parameter in manager_of(model).parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.language_model.embed_tokens.weight
        embeddings[prompt_end] = torch.nn.functional.one_hot(torch.tensor(0), width).float()
        embeddings[answer_id] = torch.nn.functional.one_hot(torch.tensor(1), width).float()
    model.lm_head.weight = nn.Parameter(head)
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = False
    return model, processor, scores


@pytest.fixture(scope="module")
def forced(tiny_dir, tmp_path_factory):
    documents = shipped_documents(LIMIT)  # the first LIMIT documents of the shipped task, as --limit takes them
    answer = Counter(document["answer"] for document in documents).most_common(1)[0][0]
    model, processor, scores = forced_answer_model(tiny_dir, answer)
    directory = tmp_path_factory.mktemp("forced")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return {"path": directory, "answer": answer, "scores": scores, "documents": documents, "processor": processor}


@pytest.fixture(scope="module")
def cli_run(forced, tmp_path_factory):
    """`python -m eval run` (the real `python -m lmms_eval` underneath) on both tiny tasks plus an unscored one."""
    root = tmp_path_factory.mktemp("cli")
    for name in ("eval", "training", "benchmarks"):  # packages of the working directory that must not be imported
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f"raise ImportError('the working directory {name}/ was imported')\n")
    tasks = shutil.copytree(TASKS_DIR, root / "tasks")
    (tasks / "unscored").mkdir()
    (tasks / "unscored" / "manager_tiny_unscored.yaml").write_text(UNSCORED_TASK)
    (tasks / "unscored" / "unscored.py").write_text("def no_score(items):\n    return None\n")
    output = root / "out"
    command = [
        sys.executable,
        "-m",
        "llava_manager",
        "eval",
        "run",
        "--model",
        "llava_ov_manager",
        "--model_args",
        f"pretrained={forced['path']},dtype=float32,grid=true,max_new_tokens=4",
        "--tasks",
        "manager_tiny,manager_tiny_mc,manager_tiny_unscored",
        "--include_path",
        str(tasks),
        "--output_path",
        str(output),
        "--batch_size",
        "5",
        "--device",
        "cpu",
        "--limit",
        str(LIMIT),
        "--log_samples",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=500, cwd=root)
    results = sorted(output.rglob("*_results.json"))
    assert len(results) == 1, process.stdout[-3000:] + process.stderr[-3000:]
    return process, json.loads(results[0].read_text()), output


def test_cli_generate_and_multiple_choice_give_the_known_scores(cli_run, forced):
    process, results, output = cli_run
    assert "running: " + sys.executable + " -m lmms_eval --model llava_ov_manager" in process.stdout
    documents, answer, scores = forced["documents"], forced["answer"], forced["scores"]
    tokenizer = forced["processor"].tokenizer

    expected_exact_match = sum(document["answer"] == answer for document in documents) / LIMIT
    assert 0 < expected_exact_match < 1
    assert results["results"]["manager_tiny"]["exact_match,none"] == pytest.approx(expected_exact_match)
    logged = [json.loads(line) for line in next(output.rglob("*_samples_manager_tiny.jsonl")).read_text().splitlines()]
    assert [sample["filtered_resps"] for sample in logged] == [answer] * LIMIT

    def pick(document, sign):  # the choice whose token the forced head scores highest (sign 1) or lowest (sign -1)
        values = [
            sign * scores[tokenizer(choice, add_special_tokens=False)["input_ids"][0]] for choice in document["choices"]
        ]
        return values.index(max(values))

    expected_accuracy = sum(pick(document, 1) == document["answer_index"] for document in documents) / LIMIT
    wrong_way_round = sum(pick(document, -1) == document["answer_index"] for document in documents) / LIMIT
    assert 0 < expected_accuracy < 1 and expected_accuracy != wrong_way_round
    assert results["results"]["manager_tiny_mc"]["acc,none"] == pytest.approx(expected_accuracy)
    assert results["n-samples"]["manager_tiny_mc"]["effective"] == LIMIT


def test_wrapper_keeps_a_checked_copy_with_its_provenance(cli_run, tmp_path, monkeypatch):
    """On success `OUTPUT/results.json` is lmms-eval's results plus how they were made (here from the real run's
    results file, less its unscored task, written by a stand-in for lmms-eval)."""
    results = copy.deepcopy(cli_run[1])  # the fixture is shared
    del results["results"]["manager_tiny_unscored"]
    source = tmp_path / "lmms_eval_wrote.json"
    source.write_text(json.dumps(results))
    written = tmp_path / "out" / "model" / "20260101_000000_results.json"
    fake_lmms_eval = (
        sys.executable,
        "-c",
        f"import os, shutil; os.makedirs({str(written.parent)!r}); shutil.copy({str(source)!r}, {str(written)!r})",
    )
    monkeypatch.setenv("MODEL_VERSION", "judge-1")
    tasks = ["--tasks", "manager_tiny,manager_tiny_mc", "--output_path", str(tmp_path / "out")]
    assert run(tasks, command=fake_lmms_eval) == 0
    stable = json.loads((tmp_path / "out" / "results.json").read_text())
    assert stable["results"] == results["results"]
    assert stable["provenance"]["libraries"]["lmms-eval"] == "0.7.3"
    assert stable["provenance"]["tasks"]["manager_tiny_mc"]["version"] == results["versions"]["manager_tiny_mc"]
    assert stable["provenance"]["judge_environment"] == {"MODEL_VERSION": "judge-1"}


def test_wrapper_fails_loudly_when_a_task_has_no_score(cli_run):
    process, results, output = cli_run
    assert results["results"]["manager_tiny_unscored"]["exact_match,none"] is None
    assert process.returncode == 1
    assert "FAILED: 1 problem(s)" in process.stderr
    assert "manager_tiny_unscored: no score for ['exact_match']" in process.stderr
    assert "manager_tiny:" not in process.stderr and "manager_tiny_mc" not in process.stderr
    assert not (output / "results.json").exists()


def test_wrapper_fails_when_lmms_eval_exits_0_without_results(tmp_path, capsys):
    # What lmms-eval 0.7.3 does on any evaluation error: print the traceback, exit 0, write nothing.
    fake_lmms_eval = (
        sys.executable,
        "-c",
        "print('Traceback (most recent call last):'); print('Error during evaluation: boom')",
    )
    code = run(["--tasks", "manager_tiny", "--output_path", str(tmp_path)], command=fake_lmms_eval)
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED: lmms-eval wrote no results file" in err and "Error during evaluation: boom" in err
    with pytest.raises(UsageError, match="needs --output_path"):  # nothing to check the results in
        run(["--tasks", "manager_tiny"], command=fake_lmms_eval)


def test_replay_serves_the_logged_answers(cli_run):
    _, _, output = cli_run
    replay = LoggedPredictions(predictions=str(output))
    logged = [json.loads(line) for line in next(output.rglob("*_samples_manager_tiny.jsonl")).read_text().splitlines()]
    requests = [
        Instance(
            request_type="generate_until",
            arguments=("", {}, None, sample["doc_id"], "manager_tiny", "test"),
            idx=0,
            metadata={"task": "manager_tiny", "doc_id": sample["doc_id"], "repeats": 1},
        )
        for sample in reversed(logged)
    ]
    raw = [sample.get("resps", sample["filtered_resps"]) for sample in reversed(logged)]
    assert replay.generate_until(requests) == [answer if isinstance(answer, str) else answer[0] for answer in raw]
    missing = Instance(
        request_type="generate_until",
        arguments=("", {}, None, LIMIT + 5, "manager_tiny", "test"),
        idx=0,
        metadata={"task": "manager_tiny", "doc_id": LIMIT + 5, "repeats": 1},
    )
    with pytest.raises(KeyError, match="no prediction for manager_tiny document 17"):
        replay.generate_until([missing])
    multiple_choice = Instance(
        request_type="generate_until",
        arguments=("", {}, None, 0, "manager_tiny_mc", "test"),
        idx=0,
        metadata={"task": "manager_tiny_mc", "doc_id": 0, "repeats": 1},
    )
    with pytest.raises(KeyError, match="cannot replay task manager_tiny_mc .* holds scores of choices"):
        replay.generate_until([multiple_choice])


def test_in_process_evaluation_matches_the_cli_and_feeds_the_report(cli_run, forced, tmp_path):
    from eval.inprocess import evaluate_checkpoints
    from eval.report import write_report

    _, cli_results, _ = cli_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        written = evaluate_checkpoints(
            {"baseline": forced["path"], "grid": forced["path"]},
            tmp_path / "runs",
            model_args="dtype=float32,max_new_tokens=4",
            batch_size=5,
            device="cpu",
            limit=LIMIT,
            task_manager=shared_task_manager(),
        )
    finally:
        torch.set_num_threads(threads)
    assert written == {name: tmp_path / "runs" / name / "results.json" for name in ("baseline", "grid")}
    logged = [
        json.loads(line) for line in next(cli_run[2].rglob("*_samples_manager_tiny.jsonl")).read_text().splitlines()
    ]
    for path in written.values():
        data = json.loads(path.read_text())
        for task, key in (("manager_tiny", "exact_match,none"), ("manager_tiny_mc", "acc,none")):
            assert data["results"][task][key] == pytest.approx(cli_results["results"][task][key])
        kept = sorted(data["samples"]["manager_tiny"], key=lambda sample: sample["doc_id"])
        # lmms-eval's sample log unwraps one-element answer lists; the in-process results keep them as returned.
        assert [sample["filtered_resps"] for sample in kept] == [[sample["filtered_resps"]] for sample in logged]
        assert data["provenance"]["tasks"]["manager_tiny"]["version"] == cli_results["versions"]["manager_tiny"]

    report, _ = write_report({name: path.parent for name, path in written.items()}, tmp_path / "report")
    tiny = {row.task: row for row in report.rows}["manager_tiny"]
    assert tiny.ours["baseline"] == pytest.approx(100 * cli_results["results"]["manager_tiny"]["exact_match,none"])
    assert tiny.ours["manager"] is None
