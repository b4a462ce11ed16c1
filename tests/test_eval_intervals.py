"""The ablation plot's 95% intervals of a gain: a paired bootstrap over documents (and over runs when a variant has
several), checked against the normal approximation of a paired difference, and read from logged samples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_eval_report import write_run

import eval.report as report_module
from eval.intervals import delta_interval, document_scores, gain_intervals
from eval.report import GAINS, Row, write_report


def scores(correct: np.ndarray) -> dict[int, float]:
    return {doc: float(value) for doc, value in enumerate(correct)}


def test_paired_bootstrap_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    n = 600
    without = rng.random(n) < 0.5
    with_ = np.where(rng.random(n) < 0.8, without, rng.random(n) < 0.7)  # correlated with `without`, as paired runs are
    low, high = delta_interval([scores(without)], [scores(with_)], resamples=4000)
    differences = with_.astype(float) - without.astype(float)
    centre, half = differences.mean(), 1.96 * differences.std(ddof=1) / math.sqrt(n)
    assert low < centre < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert (low + high) / 2 == pytest.approx(centre, abs=0.2 * half)
    # unpaired, the interval would be wider: pairing is what makes a small gain visible
    unpaired = 1.96 * math.sqrt(without.var(ddof=1) / n + with_.var(ddof=1) / n)
    assert (high - low) / 2 < unpaired


def test_identical_variants_have_a_zero_interval_and_disagreeing_seeds_widen_it():
    rng = np.random.default_rng(2)
    base = rng.random(300) < 0.6
    assert delta_interval([scores(base)], [scores(base)]) == (0.0, 0.0)
    other = rng.random(300) < 0.6
    one_run = delta_interval([scores(base)], [scores(other)])
    lucky, unlucky = other | (rng.random(300) < 0.3), other & (rng.random(300) < 0.7)  # the same variant, two seeds
    two_runs = delta_interval([scores(base)], [scores(lucky), scores(unlucky)])
    assert two_runs[1] - two_runs[0] > one_run[1] - one_run[0]
    assert delta_interval([scores(base)], [{0: 1.0}]) is None  # one shared document: no interval


def write_samples(directory, task, metric, values):
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"doc_id": doc, metric: float(value), "filtered_resps": "x"}) for doc, value in enumerate(values)
    ]
    (directory / f"20260101_000000_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")


def test_intervals_come_from_logged_samples_in_the_reports_units(tmp_path):
    rng = np.random.default_rng(3)
    baseline, manager = rng.random(200) < 0.4, rng.random(200) < 0.55
    write_samples(tmp_path / "baseline", "manager_tiny", "exact_match", baseline)
    write_samples(tmp_path / "manager", "manager_tiny", "exact_match", manager)
    assert document_scores(tmp_path / "baseline", "manager_tiny", "exact_match,none") == scores(baseline)
    row = Row(
        "tiny",
        "manager_tiny",
        "exact_match",
        100.0,
        {"baseline": 100 * baseline.mean(), "manager": 100 * manager.mean()},
    )
    runs = {name: [tmp_path / name] for name in ("baseline", "manager")}
    intervals = gain_intervals([row], runs, GAINS)
    low, high = delta_interval([scores(baseline)], [scores(manager)])
    assert intervals == {("manager_tiny", "baseline", "manager"): pytest.approx((100 * low, 100 * high))}
    # a score that is not the mean of the logged documents gets no interval
    row.ours["manager"] += 5
    assert gain_intervals([row], runs, GAINS) == {}


def test_write_report_passes_the_intervals_to_the_plot(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        report_module, "plot", lambda report, path, intervals=None: seen.update(intervals or {}) or path
    )
    rng = np.random.default_rng(4)
    runs = {}
    for name in ("baseline", "manager", "grid", "grid_manager"):
        correct = rng.random(50) < 0.5
        write_run(tmp_path / name, {}, extra={"manager_tiny": {"exact_match,none": correct.mean()}})
        write_samples(tmp_path / name / "model", "manager_tiny", "exact_match", correct)
        runs[name] = tmp_path / name
    write_report(runs, tmp_path / "report")
    assert set(seen) == {("manager_tiny", "baseline", "manager"), ("manager_tiny", "grid", "grid_manager")}
    assert all(low < high for low, high in seen.values())


def test_scores_are_read_from_the_samples_a_results_json_keeps(tmp_path):
    # the ablation's evaluations keep lmms-eval's samples in results.json
    records = [{"doc_id": 1, "acc": 1.0, "target": 2}, {"doc_id": 0, "acc": 0.0, "target": 1}, {"doc_id": 2}]
    (tmp_path / "results.json").write_text(json.dumps({"results": {}, "samples": {"manager_tiny_mc": records}}))
    assert document_scores(tmp_path / "results.json", "manager_tiny_mc", "acc,none") == {0: 0.0, 1: 1.0}
    assert document_scores(tmp_path, "manager_tiny_mc", "acc") == {0: 0.0, 1: 1.0}
    assert document_scores(tmp_path, "manager_tiny", "exact_match") is None
