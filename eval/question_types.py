"""The tiny ablation per kind of question, over seeds: each variant's score and each Δ with its 95% interval.

Reads, for every seed's run, each variant's per-document scores (the samples its `results.json` keeps), the kind of
each document (`eval.tiny_data`), and the stage-0 tower's pretraining metrics and probes (`tower/probes.json`), and
writes `question_types.md` and `question_types.csv`: the hypothesis (fixed before any run), the probe table with its
gate, and per task and kind of question the variants' scores and the Δs with intervals over seeds and documents
(`eval.intervals.delta_interval`, paired over seeds).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.synthetic import COARSE_KINDS

from .benchmarks import load_table
from .intervals import delta_interval, document_scores
from .probes import ProbeTable, probe_gate, probe_markdown
from .tiny_data import TASK_METRICS

# The variants and their labels, in the ablation table's order (eval/benchmarks.yaml: their one definition).
LABELS = {name: variant.label for name, variant in load_table().variants.items()}
# The comparisons reported, as (with, without): each arm against Baseline, and the manager with the grid.
COMPARISONS = (("manager", "baseline"), ("grid", "baseline"), ("grid_manager", "baseline"), ("grid_manager", "grid"))
# Stated before the first run (issue 18) and not changed after seeing a result.
HYPOTHESIS = (
    "On detail questions (the small marker's colour and place, the small letter), +Manager > Baseline and "
    "+Grid > Baseline, and +Grid+Manager scores best; on coarse questions (the large shape's colour and shape) the "
    "variants differ little. Why: the tower's last layer (the only one Baseline reads) is pretrained to be invariant "
    "to the details, which its intermediate layers keep and the manager reads (depth); the grid's full-resolution "
    "crops show the details larger, and views the invariance was not trained on (width)."
)


@dataclass(frozen=True)
class SeedRun:
    """One seed's run: its seed, each variant's evaluation directory, and its tower record (None without one)."""

    seed: int
    evaluations: dict[str, Path]
    tower: dict | None


@dataclass(frozen=True)
class GroupRow:
    task: str
    metric: str
    group: str
    documents: int
    means: dict[str, float]  # variant -> mean score over seeds and documents, %
    deltas: dict[tuple[str, str], tuple[float, float, float] | None]  # (with, without) -> (mean, low, high), points


def question_groups(kinds: dict[int, str]) -> dict[str, list[int]]:
    """Document ids per group: each kind, then all coarse, all detail and all documents."""
    groups = {kind: [doc for doc, k in kinds.items() if k == kind] for kind in dict.fromkeys(kinds.values())}
    coarse = [doc for doc, kind in kinds.items() if kind in COARSE_KINDS]
    if coarse and len(coarse) < len(kinds):
        groups["coarse (all)"] = coarse
        groups["detail (all)"] = [doc for doc, kind in kinds.items() if kind not in COARSE_KINDS]
    groups["all"] = list(kinds)
    return groups


def build_rows(runs: Sequence[SeedRun], tasks: Sequence[str], kinds: dict[str, dict[int, str]]) -> list[GroupRow]:
    """Per task and question group (`kinds`: each task's document ids and their kinds): every variant's mean score
    and each comparison's Δ with its interval."""
    variants = [name for name in LABELS if all(name in run.evaluations for run in runs)]
    rows = []
    for task in tasks:
        metric = TASK_METRICS[task]
        scores: dict[str, list[dict[int, float]]] = {}
        for name in variants:
            scores[name] = []
            for run in runs:
                logged = document_scores(run.evaluations[name], task, metric)
                if logged is None:
                    raise ValueError(f"no per-document {metric} of {task} in {run.evaluations[name]}")
                scores[name].append(logged)
        for group, documents in question_groups(kinds[task]).items():
            chosen = set(documents)
            means = {
                name: 100 * float(np.mean([value for run in values for doc, value in run.items() if doc in chosen]))
                for name, values in scores.items()
            }
            deltas = {}
            for with_, without in COMPARISONS:
                if with_ not in scores or without not in scores:
                    continue
                span = delta_interval(scores[without], scores[with_], paired_runs=True, documents=chosen)
                deltas[with_, without] = (
                    None if span is None else (means[with_] - means[without], 100 * span[0], 100 * span[1])
                )
            rows.append(GroupRow(task, metric, group, len(documents), means, deltas))
    return rows


def _format(delta: tuple[float, float, float] | None) -> str:
    return "–" if delta is None else f"{delta[0]:+.1f} [{delta[1]:+.1f}, {delta[2]:+.1f}]"


def verdicts(rows: Sequence[GroupRow]) -> list[str]:
    """Each clause of the hypothesis against the intervals of the pooled detail and coarse groups."""
    lines = []
    for row in rows:
        if row.group not in ("detail (all)", "coarse (all)"):
            continue
        for (with_, without), delta in row.deltas.items():
            if delta is None:
                continue
            if row.group == "coarse (all)":
                state = "differs from zero" if delta[1] > 0 or delta[2] < 0 else "no difference shown"
            else:
                state = ("above zero: supported" if delta[1] > 0 else
                         "below zero: contradicted" if delta[2] < 0 else "interval holds zero: not shown")  # fmt: skip
            lines.append(f"{row.task}, {row.group}: {LABELS[with_]} − {LABELS[without]} = {_format(delta)} ({state})")
    return lines


def write_question_report(
    runs: Sequence[SeedRun], tasks: Sequence[str], kinds: dict[str, dict[int, str]], out: Path
) -> Path:
    """Write `question_types.md` and `question_types.csv` to `out`; return the markdown file."""
    rows = build_rows(runs, tasks, kinds)
    seeds = [run.seed for run in runs]
    out.mkdir(parents=True, exist_ok=True)
    # The hypothesis compares detail with coarse questions: on coarse questions alone (the `easy` scenes) it is untested.
    detailed = any(kind not in COARSE_KINDS for task_kinds in kinds.values() for kind in task_kinds.values())
    lines = ["# The tiny ablation per kind of question", ""]
    if detailed:
        lines += [f"**Hypothesis** (stated before running): {HYPOTHESIS}", ""]
    else:
        lines += [
            (
                "The tasks ask coarse questions only (about the one large shape): the hypothesis on detail questions "
                "is not tested here (`llava-manager ablation`, the detail world, tests it)."
            ),
            "",
        ]
    towers = [run for run in runs if run.tower is not None]
    if towers:
        lines += ["## Where the information lives: linear probes of the vision tower", ""]
        lines += [
            (
                "Each seed's tiny SigLIP after its pretraining (coarse classification + invariance to the details + "
                "InfoNCE, on the hidden state LLaVA reads), before stage 0 assembles it. Each hidden state's patch "
                "tokens, concatenated, probed (held-out scenes) for each kind of question; the hidden states are "
                "those the assembled tower keeps. The world was tuned on these probes, before and without the "
                "ablation's outcome."
            ),
            "",
        ]
        for run in towers:
            table = ProbeTable.from_dict(run.tower["probes"])
            lines += probe_markdown({f"seed {run.seed}": table})
            lines += [f"- gate: {probe_gate(table).message}", ""]
            metrics = ", ".join(f"{key} {value:.4g}" for key, value in run.tower["pretraining"].items())
            lines += [f"- pretraining: {metrics}", ""]
    variants = list(rows[0].means)
    comparisons = list(rows[0].deltas)
    lines += [
        "## Scores and Δs per kind of question",
        "",
        (
            f"Seeds {seeds} (each its own tower, base model, data and training order); the same evaluated documents "
            "for every seed and variant. Scores: mean over seeds and documents, %. Δ: mean [95% interval, paired "
            "bootstrap over seeds and documents], points."
        ),
        "",
    ]
    header = ["Task", "Questions", "docs", *(LABELS[name] for name in variants)]
    header += [f"{LABELS[w]} − {LABELS[wo]}" for w, wo in comparisons]
    lines += ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for row in rows:
        cells = [f"{row.task} ({row.metric})", row.group, str(row.documents)]
        cells += [f"{row.means[name]:.1f}" for name in variants] + [_format(row.deltas[key]) for key in comparisons]
        lines.append("| " + " | ".join(cells) + " |")
    if detailed:
        lines += ["", "## The hypothesis against the intervals", ""] + [f"- {line}" for line in verdicts(rows)]
    if len(runs) == 1:
        lines += [
            "",
            (
                "One seed cannot show significance: its intervals cover the documents drawn, not the training noise "
                "of another seed. `llava-manager ablation --seeds 3` (or more; it reuses this seed's run) gives "
                "intervals over seeds."
            ),
        ]
    markdown = out / "question_types.md"
    markdown.write_text("\n".join(lines) + "\n")
    with (out / "question_types.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        deltas = [f"{w}-{wo}{part}" for w, wo in comparisons for part in ("", "_low", "_high")]
        writer.writerow(["task", "metric", "questions", "documents", "seeds", *variants, *deltas])
        for row in rows:
            values = [row.deltas[key] or (None, None, None) for key in comparisons]
            writer.writerow(
                [row.task, row.metric, row.group, row.documents, len(runs)]
                + [f"{row.means[name]:.2f}" for name in variants]
                + ["" if value is None else f"{value:.2f}" for delta in values for value in delta]
            )
    return markdown
