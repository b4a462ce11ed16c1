"""Reading lmms-eval results JSONs: one file, or every `*_results.json` of a run directory, merged per task."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manager_plugin.provenance import environment_provenance

RESULTS_GLOB = "*_results.json"
STABLE_NAME = "results.json"  # the copy `python -m eval run` leaves at the top of its --output_path
# Environment variables lmms-eval 0.7.3's judged tasks read to pick their judge (e.g. mmvet's MODEL_VERSION).
JUDGE_ENVIRONMENT = ("MODEL_VERSION", "API_TYPE")


@dataclass
class Results:
    """Per-task metrics of one or more lmms-eval runs (a later run's task replaces an earlier one's)."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    subtasks: dict[str, list[str]] = field(default_factory=dict)  # group -> member tasks
    samples: dict[str, int] = field(default_factory=dict)  # task -> documents evaluated
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)
    provenance: list[dict[str, Any]] = field(default_factory=list)  # what each source recorded (see add_provenance)

    def add(self, data: dict[str, Any], source: Path) -> None:
        if "results" not in data:
            raise ValueError(f"{source} is not an lmms-eval results file (it has no 'results' key)")
        self.tasks.update(data["results"])
        self.subtasks.update(data.get("group_subtasks", {}))
        self.samples.update({task: int(count.get("effective", 0)) for task, count in data.get("n-samples", {}).items()})
        self.configs.update(data.get("configs", {}))
        self.sources.append(source)
        if "provenance" in data:
            self.provenance.append(data["provenance"])

    def value(self, task: str, key: str) -> float | None:
        """The finite number stored under `key` (`<metric>,<filter>`) for `task`, or None."""
        value = self.tasks.get(task, {}).get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    def leaves(self, name: str) -> list[str]:
        """The leaf tasks under `name` (itself when it is a task)."""
        members = self.subtasks.get(name)
        if not members:
            return [name]
        return [leaf for member in members for leaf in self.leaves(member)]


def task_provenance(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task of an lmms-eval results dict: its version, dataset (path, name, revision) and judge model, if any.

    A revision of None means the dataset's default branch as it was when it was downloaded.
    """
    versions = data.get("versions", {})
    described = {}
    for task, config in sorted(data.get("configs", {}).items()):
        metadata = config.get("metadata") or {}
        dataset_kwargs = config.get("dataset_kwargs") or {}
        described[task] = {
            "version": versions.get(task, metadata.get("version")),
            "dataset_path": config.get("dataset_path"),
            "dataset_name": config.get("dataset_name"),
            "dataset_revision": dataset_kwargs.get("revision"),
            "judge_model": metadata.get("gpt_eval_model_name"),
        }
    return described


def add_provenance(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (an lmms-eval results dict) with a `provenance` entry: how it was made, down to each task's data."""
    judge_environment = {name: os.environ[name] for name in JUDGE_ENVIRONMENT if name in os.environ}
    provenance = {**environment_provenance(), "tasks": task_provenance(data), "judge_environment": judge_environment}
    return {**data, "provenance": provenance}


def result_files(path: str | Path) -> list[Path]:
    """The results files at `path` (a file, or a run directory searched recursively), oldest first."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no lmms-eval results at {path}")
    files = [file for file in path.rglob(RESULTS_GLOB)]
    if not files and (path / STABLE_NAME).is_file():
        files = [path / STABLE_NAME]
    return sorted(files, key=lambda file: (file.stat().st_mtime, file.name))


def _predict_only(data: dict[str, Any]) -> bool:
    return bool(data.get("config", {}).get("resolved_cli_args", {}).get("predict_only"))


def load_results(path: str | Path) -> Results:
    """Everything lmms-eval reported under `path`; raises if it holds no results file.

    In a directory, the results of predict-only runs are skipped: they hold answers, not scores.
    """
    files = result_files(path)
    if not files:
        raise FileNotFoundError(f"no lmms-eval results (*_results.json) under {path}")
    results = Results()
    for file in files:
        data = json.loads(file.read_text())
        if len(files) == 1 or not _predict_only(data):
            results.add(data, file)
    if not results.sources:
        raise FileNotFoundError(f"only predict-only runs under {path}: score their logged answers first")
    return results
