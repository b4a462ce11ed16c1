"""The paper-style ablation report: Baseline / +Manager / +Grid / +Grid+Manager per task, with the paper's numbers.

`python -m eval report baseline=RUN manager=RUN grid=RUN grid_manager=RUN --out DIR` (RUN: a results JSON, or the
`--output_path` of one or more lmms-eval runs) writes `ablation.md`, `ablation.csv` and `ablation.png` to DIR.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from manager_plugin.provenance import describe_environment, environment_provenance

from .benchmarks import Benchmark, BenchmarkTable, load_table
from .results import Results, load_results

MISSING = "—"


@dataclass
class Row:
    """One line of the table: our score per variant and the paper's, in the paper's units."""

    label: str
    task: str
    metric: str
    full_scale: float
    ours: dict[str, float | None]
    paper: dict[str, float | None] = field(default_factory=dict)

    def normalised(self, values: dict[str, float | None]) -> dict[str, float | None]:
        """`values` as a percentage of a perfect score (OCRBench's 1000 points become 100)."""
        return {name: None if value is None else 100 * value / self.full_scale for name, value in values.items()}


@dataclass
class Report:
    variants: list[str]  # the table's variant names, in order
    labels: dict[str, str]
    rows: list[Row]
    average: Row | None
    notes: list[str]
    provenance: list[str] = field(default_factory=list)  # how the report and its evaluations were made, in lines


def provenance_lines(results: dict[str, Results], labels: dict[str, str]) -> list[str]:
    """Lines for people: the environment of this report and of each variant's evaluation, then each task's version,
    dataset and judge (merged over the variants)."""
    lines = [f"report: {describe_environment(environment_provenance())}"]
    evaluated: dict[str, list[str]] = {}
    tasks: dict[str, dict] = {}
    for name, result in results.items():
        if not result.provenance:
            evaluated.setdefault("not recorded (results written without `python -m eval run`)", []).append(name)
        for recorded in result.provenance:
            evaluated.setdefault(describe_environment(recorded), []).append(name)
            tasks.update(recorded.get("tasks", {}))
    for environment, names in evaluated.items():
        lines.append(
            f"evaluation of {', '.join(labels.get(name, name) for name in dict.fromkeys(names))}: {environment}"
        )
    for task, about in sorted(tasks.items()):
        dataset = "/".join(part for part in (about.get("dataset_path"), about.get("dataset_name")) if part)
        revision = about.get("dataset_revision") or "default branch at download"
        data = f"data {dataset} ({revision})" if dataset else "data made by the task itself (no dataset path)"
        judge = f", judge {about['judge_model']}" if about.get("judge_model") else ""
        lines.append(f"task {task}: version {about.get('version')}, {data}{judge}")
    return lines


def parse_runs(items: list[str], table: BenchmarkTable) -> dict[str, Path]:
    """`VARIANT=PATH` arguments as {variant name: path}; labels such as +Grid+Manager are accepted too."""
    aliases = {name.lower(): name for name in table.variants}
    aliases.update({variant.label.lower(): name for name, variant in table.variants.items()})
    runs: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"{item!r}: expected VARIANT=PATH with VARIANT one of {list(table.variants)}")
        if name.lower() not in aliases:
            raise ValueError(f"unknown variant {name!r} in {item!r}: expected one of {list(table.variants)}")
        variant = aliases[name.lower()]
        if variant in runs:
            raise ValueError(f"variant {variant} given twice")
        runs[variant] = Path(path)
    return runs


def _benchmark_row(benchmark: Benchmark, results: dict[str, Results], notes: list[str]) -> Row | None:
    """The benchmark's row, or None when no variant's results hold its task."""
    present = [name for name, run in results.items() if benchmark.score_task in run.tasks]
    if not present:
        return None
    where = f"{benchmark.label} ({benchmark.score_task})"
    ours: dict[str, float | None] = {}
    for name, run in results.items():
        value = run.value(benchmark.score_task, benchmark.result_key)
        ours[name] = None if value is None else value * benchmark.scale
        if value is None and name in present and benchmark.scored_by != "server":
            keys = sorted(key for key in run.tasks[benchmark.score_task] if "," in key and "_stderr" not in key)
            notes.append(f"{where}: the {name} results have no '{benchmark.result_key}' (they have {keys})")
    absent = [name for name in results if name not in present]
    if absent:
        notes.append(f"{where}: missing from the results of {', '.join(absent)}")
    if benchmark.scored_by == "server":
        notes.append(f"{where}: scored by the benchmark's server from the submission file each run wrote")
    label = benchmark.label if benchmark.score_task == benchmark.task else f"{benchmark.label} ({benchmark.score_task})"
    return Row(label, benchmark.score_task, benchmark.metric, benchmark.full_scale, ours, dict(benchmark.paper))


def _other_rows(results: dict[str, Results], covered: set[str]) -> list[Row]:
    """Rows for tasks the table does not know: their first numeric metric, as reported."""
    rows: dict[str, Row] = {}
    for name, run in results.items():
        grouped = {member for members in run.subtasks.values() for member in members}
        for task, metrics in run.tasks.items():
            if task in covered or run.subtasks.get(task) or task in grouped:
                continue
            keys = [key for key in metrics if "," in key and "_stderr" not in key and run.value(task, key) is not None]
            if keys:
                row = rows.setdefault(task, Row(task, task, keys[0], 100.0, {}))
                row.ours[name] = run.value(task, row.metric)
    return list(rows.values())


def _average(
    rows: list[Row], variants: list[str], protocol: set[str], paper_average: dict[str, float], notes: list[str]
) -> Row | None:
    """The mean over the tasks every given variant has a score for (the protocol's tasks when there are any)."""
    if any(row.task in protocol for row in rows):
        rows = [row for row in rows if row.task in protocol]
    given = [name for name in variants if any(row.ours[name] is not None for row in rows)]
    complete = [row for row in rows if given and all(row.ours[name] is not None for name in given)]
    if not complete:
        return None
    ours = {
        name: sum(row.normalised(row.ours)[name] for row in complete) / len(complete) if name in given else None
        for name in variants
    }
    covers_protocol = {row.task for row in complete} == protocol
    if not covers_protocol and rows[0].task in protocol:
        notes.append(
            f"the paper's average covers its {len(protocol)} tasks; ours covers the {len(complete)} of them that "
            "every variant has a score for"
        )
    paper = dict(paper_average) if covers_protocol else {}
    return Row(
        f"Average ({len(complete)} tasks)",
        "average",
        "% of full score",
        100.0,
        ours,
        {name: paper.get(name) for name in variants},
    )


def build_report(results: dict[str, Results], table: BenchmarkTable | None = None) -> Report:
    """Rows for every task in `results` (table order first), an average, and notes on whatever is missing."""
    table = table or load_table()
    if not results:
        raise ValueError(f"no results given: pass VARIANT=PATH for some of {list(table.variants)}")
    variants = list(table.variants)
    labels = {name: variant.label for name, variant in table.variants.items()}
    notes = [f"variant {labels[name]} ({name}): no results given" for name in variants if name not in results]
    rows = [row for benchmark in table.benchmarks if (row := _benchmark_row(benchmark, results, notes))]
    protocol = {benchmark.score_task for benchmark in table.protocol()}
    if any(row.task in protocol for row in rows):
        missing = [
            benchmark.label for benchmark in table.protocol() if benchmark.score_task not in {r.task for r in rows}
        ]
        if missing:
            notes.append(f"tasks of the paper's protocol in no results: {', '.join(missing)}")
    else:
        notes.append("no task of the paper's protocol in the results: paper numbers are not compared")
    rows += _other_rows(results, {benchmark.score_task for benchmark in table.benchmarks})
    if not rows:
        raise ValueError("the given results hold no task with a numeric score")
    for row in rows:
        row.ours = {name: row.ours.get(name) for name in variants}
        row.paper = {name: row.paper.get(name) for name in variants}
    for name in results:
        if all(row.ours[name] is None for row in rows):
            notes.append(f"variant {labels[name]} ({name}): its results hold none of the reported tasks")
    known = [row for row in rows if row.task in {benchmark.score_task for benchmark in table.benchmarks}]
    average = _average(known, variants, protocol, table.paper_average, notes)
    return Report(variants, labels, rows, average, notes, provenance_lines(results, labels))


# -- writing ---------------------------------------------------------------------------------------------------------
def _fmt(value: float | None, full_scale: float, signed: bool = False) -> str:
    if value is None:
        return MISSING
    digits = 1 if full_scale > 100 else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _delta(values: dict[str, float | None], a: str, b: str) -> float | None:
    return None if values.get(a) is None or values.get(b) is None else values[b] - values[a]


# The manager's gain in each setting: (without, with).
GAINS = (("baseline", "manager"), ("grid", "grid_manager"))


def write_markdown(report: Report, path: Path) -> Path:
    """The table as markdown: `ours (paper)` per variant, the manager's gains, then the notes."""
    header = ["Task", "Metric"]
    for without, with_ in GAINS:
        header += [report.labels[without], report.labels[with_], "Δ"]
    lines = [
        "# Grid vs manager ablation",
        "",
        "Each cell: ours (paper). Δ: the manager's gain in that setting. Scores in the paper's units.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * 2 + "---:|" * (len(header) - 2),
    ]
    for row in report.rows + ([report.average] if report.average else []):
        cells = [row.label, row.metric]
        for without, with_ in GAINS:
            for name in (without, with_):
                ours, paper = _fmt(row.ours[name], row.full_scale), row.paper.get(name)
                cells.append(ours if paper is None else f"{ours} ({_fmt(paper, row.full_scale)})")
            gain, paper_gain = _delta(row.ours, without, with_), _delta(row.paper, without, with_)
            cell = _fmt(gain, row.full_scale, signed=True)
            cells.append(cell if paper_gain is None else f"{cell} ({_fmt(paper_gain, row.full_scale, signed=True)})")
        if row is report.average:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    if report.provenance:
        lines += ["", "## Provenance", ""] + [f"- {line}" for line in report.provenance]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(report: Report, path: Path) -> Path:
    """The table as CSV: one row per task (and the average), our and the paper's number per variant.

    The provenance comes first as `# ` comment lines (`pandas.read_csv(path, comment="#")` skips them).
    """
    with path.open("w", newline="") as handle:
        handle.writelines(f"# {line}\n" for line in report.provenance)
        writer = csv.writer(handle)
        writer.writerow(["task", "label", "metric", *report.variants, *(f"paper_{name}" for name in report.variants)])
        for row in report.rows + ([report.average] if report.average else []):
            writer.writerow(
                [row.task, row.label, row.metric]
                + ["" if row.ours[name] is None else f"{row.ours[name]:.4f}" for name in report.variants]
                + ["" if row.paper.get(name) is None else row.paper[name] for name in report.variants]
            )
    return path


COLOURS = {"baseline": "#9e9e9e", "manager": "#1f77b4", "grid": "#ffb74d", "grid_manager": "#d62728"}


def plot(report: Report, path: Path, intervals: dict[tuple[str, str, str], tuple[float, float]] | None = None) -> Path:
    """Scores (left) and the manager's gains (right) per task, each gain with its 95% interval where `intervals`
    (`eval.intervals.gain_intervals`) has one; black diamonds mark the paper's numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows + ([report.average] if report.average else [])
    height = 1.8 + 0.55 * len(rows)
    figure, (scores_ax, gains_ax) = plt.subplots(
        1, 2, figsize=(14, height), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    bar = 0.8 / len(report.variants)
    centres = list(range(len(rows)))
    for index, name in enumerate(report.variants):
        offset = (index - (len(report.variants) - 1) / 2) * bar
        ys = [centre + offset for centre in centres]
        ours = [row.normalised(row.ours)[name] for row in rows]
        paper = [row.normalised(row.paper).get(name) for row in rows]
        scores_ax.barh(
            ys, [math.nan if v is None else v for v in ours], height=bar, color=COLOURS[name], label=report.labels[name]
        )
        scores_ax.scatter(
            [v for v in paper if v is not None],
            [y for y, v in zip(ys, paper) if v is not None],
            marker="D",
            s=14,
            color="black",
            zorder=3,
            label="paper" if index == 0 else None,
        )
    for index, (without, with_) in enumerate(GAINS):
        offset = (index - 0.5) * 0.4
        ys = [centre + offset for centre in centres]
        gains = [_delta(row.normalised(row.ours), without, with_) for row in rows]
        paper_gains = [_delta(row.normalised(row.paper), without, with_) for row in rows]
        spans = [(intervals or {}).get((row.task, without, with_)) for row in rows]
        errors = [
            [math.nan if span is None or g is None else g - span[0] for g, span in zip(gains, spans)],
            [math.nan if span is None or g is None else span[1] - g for g, span in zip(gains, spans)],
        ]
        gains_ax.barh(
            ys,
            [math.nan if g is None else g for g in gains],
            height=0.4,
            color=COLOURS[with_],
            label=f"{report.labels[with_]} − {report.labels[without]}",
            xerr=errors if any(span is not None for span in spans) else None,
            error_kw={"ecolor": "black", "capsize": 3, "elinewidth": 1},
        )
        gains_ax.scatter(
            [g for g in paper_gains if g is not None],
            [y for y, g in zip(ys, paper_gains) if g is not None],
            marker="D",
            s=14,
            color="black",
            zorder=3,
        )
    gains_ax.axvline(0, color="black", linewidth=0.8)
    scores_ax.set_yticks(centres, [row.label for row in rows])
    scores_ax.set_ylim(len(rows) - 0.5, -0.5)  # first task on top
    if report.average:
        scores_ax.get_yticklabels()[-1].set_fontweight("bold")
    scores_ax.set_xlabel("score, % of a perfect score (OCRBench ÷ 10)")
    gains_ax.set_xlabel("the manager's gain, points (OCRBench ÷ 10)")
    scores_ax.set_title("Scores per variant (◆ paper)")
    gains_ax.set_title(
        "Gain from the manager (◆ paper; whiskers: 95% bootstrap interval)"
        if intervals
        else "Gain from the manager (◆ paper; no per-document scores logged: no intervals)"
    )
    for axis, columns in ((scores_ax, 5), (gains_ax, 1)):
        axis.grid(axis="x", alpha=0.3)
        below_label = -0.65 / (height - 1.2)  # about 0.65 inch under the axis, clear of its label
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, below_label), ncol=columns, fontsize=8)
    figure.suptitle("Grid vs manager ablation", fontweight="bold")
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def write_report(runs: dict[str, Path], out: str | Path, notes: Sequence[str] = ()) -> tuple[Report, list[Path]]:
    """Load each variant's results, build the report, write markdown, CSV and PNG to `out`; `notes` are added to
    the report's own."""
    from .intervals import gain_intervals

    results = {name: load_results(path) for name, path in runs.items()}
    report = build_report(results)
    rows = report.rows + ([report.average] if report.average else [])
    intervals = gain_intervals(rows, {name: [Path(path)] for name, path in runs.items()}, GAINS)
    report.notes += list(notes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        write_markdown(report, out / "ablation.md"),
        write_csv(report, out / "ablation.csv"),
        plot(report, out / "ablation.png", intervals),
    ]
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    return report, paths
