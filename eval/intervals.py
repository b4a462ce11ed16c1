"""95% intervals for the difference between two variants' scores: a paired bootstrap over documents, and over seeds
(training runs) when a variant has several.

Per-document scores come from the samples lmms-eval logs: `*samples_<task>.jsonl` (written with `--log_samples`), or
the `samples` the ablation's evaluations keep in their `results.json`. Both variants answer the same documents, so each bootstrap draw resamples
one set of documents for both (paired); with several runs per variant, each draw also resamples each variant's runs.
When the runs are seeds of one experiment (`paired_runs`: run i of both variants shares seed i's tower, data and
order), each draw resamples the seeds once for both: a two-level paired bootstrap over seeds and documents.
`documents` restricts an interval to some documents (one kind of question).
An interval is only given where the task's score is the mean over documents (checked against the reported scores).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from .results import STABLE_NAME

LEVEL = 0.95
RESAMPLES = 2000


@lru_cache(maxsize=16)
def _results_samples(path: Path, modified: float) -> dict[str, list[dict]]:
    """The `samples` a results JSON keeps (the ablation's evaluations), read once per file version."""
    return json.loads(path.read_text()).get("samples") or {}


def _logged_records(run: Path, task: str) -> list[dict] | None:
    """The logged per-document records of `task` for a run: from its results JSON's `samples`, else from the newest
    `*samples_<task>.jsonl` lmms-eval wrote beside or under it (`--log_samples`)."""
    results = run if run.is_file() else run / STABLE_NAME
    if results.is_file():
        samples = _results_samples(results, results.stat().st_mtime)
        if task in samples:
            return samples[task]
    directory = run if run.is_dir() else run.parent
    files = sorted(directory.rglob(f"*samples_{task}.jsonl"), key=lambda path: path.stat().st_mtime)
    if not files:
        return None
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def document_scores(run: Path, task: str, metric: str) -> dict[int, float] | None:
    """{doc_id: score} of `metric` (`name` or `name,filter`) on `task` as the run logged it; None if not logged."""
    name = metric.split(",")[0]
    scores = {
        int(record["doc_id"]): float(record[name])
        for record in _logged_records(run, task) or []
        if isinstance(record.get(name), bool | int | float)
    }
    return scores or None


def _means(runs: np.ndarray, documents: np.ndarray, picks: np.ndarray | None) -> np.ndarray:
    """Per draw: the mean over the drawn runs of each run's mean over the drawn documents."""
    per_run = runs[:, documents].mean(axis=2)  # (runs, draws)
    if picks is None:
        return per_run[0]
    return np.take_along_axis(per_run.T, picks, axis=1).mean(axis=1)


def delta_interval(
    without: Sequence[dict[int, float]],
    with_: Sequence[dict[int, float]],
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    paired_runs: bool = False,
    documents: Collection[int] | None = None,
) -> tuple[float, float] | None:
    """The `level` percentile interval of mean(with_) - mean(without) over the documents every run scored (those of
    them in `documents`, when given); `paired_runs`: run i of `without` and of `with_` are one seed's."""
    shared = sorted(set.intersection(*(set(run) for run in [*without, *with_])))
    if documents is not None:
        chosen = set(documents)
        shared = [doc for doc in shared if doc in chosen]
    if len(shared) < 2:
        return None
    if paired_runs and len(without) != len(with_):
        raise ValueError(f"paired runs: {len(without)} runs without and {len(with_)} with, expected as many (seeds)")
    a = np.array([[run[doc] for doc in shared] for run in without])
    b = np.array([[run[doc] for doc in shared] for run in with_])
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(shared), size=(resamples, len(shared)))
    picks_a = rng.integers(0, len(a), size=(resamples, len(a))) if len(a) > 1 else None
    picks_b = picks_a if paired_runs else rng.integers(0, len(b), size=(resamples, len(b))) if len(b) > 1 else None
    deltas = _means(b, drawn, picks_b) - _means(a, drawn, picks_a)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return float(low), float(high)


def gain_intervals(
    rows: Sequence, runs: dict[str, Sequence[Path]], pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str, str], tuple[float, float]]:
    """{(task, without, with): interval in the report's points} for each row and pair whose documents were logged.

    `rows` are the report's rows (`task`, `metric`, `normalised`, `ours`); a row's interval is scaled into its units by
    the factor that turns each variant's mean document score into its reported score, which must be the same for
    both variants (else the score is not a document mean, and no interval is given).
    """
    intervals = {}
    for row in rows:
        reported = row.normalised(row.ours)
        for without, with_ in pairs:
            if without not in runs or with_ not in runs or reported.get(without) is None or reported.get(with_) is None:
                continue
            scores = {
                name: [document_scores(path, row.task, row.metric) for path in runs[name]] for name in (without, with_)
            }
            if any(score is None for values in scores.values() for score in values):
                continue
            factor = _units(scores, reported)
            if factor is None:
                continue
            interval = delta_interval(scores[without], scores[with_])
            if interval is not None:
                intervals[row.task, without, with_] = (factor * interval[0], factor * interval[1])
    return intervals


def _units(scores: dict[str, list[dict[int, float]]], reported: dict[str, float | None]) -> float | None:
    """Report points per unit of mean document score, if one factor fits every variant."""
    factors = []
    for name, runs in scores.items():
        mean = float(np.mean([np.mean(list(run.values())) for run in runs]))
        if mean == 0:
            if abs(reported[name]) > 1e-9:
                return None
            continue
        factors.append(reported[name] / mean)
    if not factors or any(abs(factor - factors[0]) > 1e-6 * abs(factors[0]) for factor in factors):
        return None
    return factors[0]
