"""The evaluation-throughput benchmark at the tiny size: it runs end to end, and its agreement check compares answers."""

from __future__ import annotations

import copy
import json

import pytest

from benchmarks import throughput
from eval.tiny_data import generate_documents


@pytest.fixture(scope="module")
def measured(tmp_path_factory, single_thread):
    """The three tiny models after one round on two documents: documents, models, their answers, the reference."""
    documents = generate_documents(2, seed=0, preset="easy")
    directory = tmp_path_factory.mktemp("throughput")
    built = throughput.write_checkpoints("tiny", directory, "static", 0, documents)
    subjects = throughput.build_subjects(directory, throughput.torch.device("cpu"), "sdpa", documents)
    answers = {}
    times = throughput.run_round(subjects, documents, 4, answers)
    assert set(times) == set(throughput.SUBJECTS)
    assert all(set(values) == set(throughput.METRICS) and min(values.values()) > 0 for values in times.values())
    reference = throughput.reference_choice_scores(subjects[2].model, documents)
    return documents, built, answers, reference


def test_agreement_holds_on_the_same_checkpoint(measured):
    documents, built, answers, reference = measured
    summary = throughput.check_agreement(answers, reference, documents)
    assert summary["generation"]["identical"] == len(documents)
    assert summary["generation"]["distinct_answers"] == len(documents)  # answers depend on the document
    assert summary["choice"]["requests"] == sum(len(document["choices"]) for document in documents)
    assert max(summary["choice"]["max_abs_difference"].values()) <= throughput.LOGLIKELIHOOD_TOLERANCE
    assert built["prefill_floor"] > 1.0


def test_agreement_fails_when_answers_differ(measured):
    documents, _, answers, reference = measured
    changed = copy.deepcopy(answers)
    changed["llava_hf"]["generate"][1] += "x"
    with pytest.raises(throughput.AgreementError, match="document 1"):
        throughput.check_agreement(changed, reference, documents)
    for model in ("ours", "llava_hf"):
        changed = copy.deepcopy(answers)
        changed[model]["choice"][3] += 10 * throughput.LOGLIKELIHOOD_TOLERANCE
        with pytest.raises(throughput.AgreementError, match="choice"):
            throughput.check_agreement(changed, reference, documents)
    changed = copy.deepcopy(answers)
    changed["ours"]["generate"] = changed["llava_hf"]["generate"] = [""] * len(documents)
    with pytest.raises(throughput.AgreementError, match="empty"):
        throughput.check_agreement(changed, reference, documents)
    # The manager model's answers are not compared (it is another model).
    changed = copy.deepcopy(answers)
    changed["ours_manager"]["generate"][0] += "x"
    throughput.check_agreement(changed, reference, documents)


def test_command_writes_the_table(tmp_path, single_thread):
    argv = ["--size", "tiny", "--documents", "1", "--rounds", "1", "--max-new-tokens", "2", "--out", str(tmp_path)]
    result = throughput.main(argv)
    saved = json.loads((tmp_path / "throughput-tiny-cpu.json").read_text())
    assert saved["command"] == "python -m benchmarks throughput " + " ".join(argv)
    assert set(saved["measurements"]) == set(throughput.SUBJECTS)
    assert set(saved["ratios"]) == set(throughput.PAIRS)
    for name in throughput.SUBJECTS:
        assert saved["measurements"][name]["generate_docs_per_s"]["median"] > 0
    assert "| lmms-eval llava_hf |" in (tmp_path / "throughput-tiny-cpu.md").read_text()
    assert result["agreement"] == saved["agreement"]


def test_bad_options_are_refused():
    with pytest.raises(throughput.UsageError, match="--documents 0"):
        throughput.parse_args(["--documents", "0"])
    with pytest.raises(throughput.UsageError, match="--manager-type"):
        throughput.parse_args(["--manager-type", "nope"])
