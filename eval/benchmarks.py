"""The ablation's data table (`benchmarks.yaml`): variants, benchmarks, how to read their scores, paper numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

TABLE_PATH = Path(__file__).resolve().parent / "benchmarks.yaml"
PROTOCOL_SIZE = 20  # the paper's protocol: 13 locally scored + 7 judged tasks


@dataclass(frozen=True)
class Variant:
    """One arm of the ablation: its name, its label in tables, and whether it evaluates with AnyRes grids."""

    name: str
    label: str
    grid: bool


@dataclass(frozen=True)
class Benchmark:
    """One evaluated dataset: the lmms-eval task the protocol runs, where its score is read, and the paper's numbers."""

    task: str
    label: str
    metric: str
    scale: float
    full_scale: float
    score_task: str = ""
    filter: str = "none"
    judge: bool = False
    scored_by: str = "lmms-eval"
    protocol: bool = True
    paper: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.score_task:
            object.__setattr__(self, "score_task", self.task)
        if self.scored_by not in ("lmms-eval", "server"):
            raise ValueError(
                f"benchmark {self.task}: scored_by must be 'lmms-eval' or 'server', got {self.scored_by!r}"
            )
        if self.scale <= 0 or self.full_scale <= 0:
            raise ValueError(f"benchmark {self.task}: scale and full_scale must be positive")

    @property
    def result_key(self) -> str:
        """The key of the score in lmms-eval's results JSON."""
        return f"{self.metric},{self.filter}"


@dataclass(frozen=True)
class BenchmarkTable:
    variants: dict[str, Variant]
    benchmarks: tuple[Benchmark, ...]
    paper_average: dict[str, float]

    def protocol(self) -> tuple[Benchmark, ...]:
        """The benchmarks of the paper's 20-task protocol."""
        return tuple(benchmark for benchmark in self.benchmarks if benchmark.protocol)


def _check_variants(names: Any, where: str, variants: dict[str, Variant]) -> None:
    unknown = sorted(set(names) - set(variants))
    if unknown:
        raise ValueError(f"{where}: unknown variants {unknown}; expected some of {list(variants)}")


@cache
def load_table(path: Path = TABLE_PATH) -> BenchmarkTable:
    """The table in `path`, validated (variant names, one entry per task, 20 protocol tasks)."""
    data = yaml.safe_load(path.read_text())
    variants = {name: Variant(name=name, **spec) for name, spec in data["variants"].items()}
    benchmarks = tuple(Benchmark(**spec) for spec in data["benchmarks"])
    for benchmark in benchmarks:
        _check_variants(benchmark.paper, f"{path} benchmark {benchmark.task}", variants)
    _check_variants(data["paper_average"], f"{path} paper_average", variants)
    tasks = [benchmark.task for benchmark in benchmarks]
    duplicated = sorted({task for task in tasks if tasks.count(task) > 1})
    if duplicated:
        raise ValueError(f"{path}: benchmarks listed twice: {duplicated}")
    table = BenchmarkTable(variants=variants, benchmarks=benchmarks, paper_average=dict(data["paper_average"]))
    if len(table.protocol()) != PROTOCOL_SIZE:
        raise ValueError(f"{path}: the protocol has {len(table.protocol())} benchmarks, expected {PROTOCOL_SIZE}")
    return table
