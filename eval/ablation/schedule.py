"""Schedules: how long and on what the ablation trains and evaluates, as data (one YAML each in `schedules/`).

A schedule holds the synthetic data's size (used when no `--data` is given), `python -m training` options for every
stage (`all`) and per recipe stage (`"1"`, `"1.5"`, `"2"`; these win), the evaluation's batch size, document limit and
model arguments, the lmms-eval tasks it evaluates (`tasks`, default manager_tiny and manager_tiny_mc; `--tasks` wins),
and (`tower`) how the tiny SigLIP is pretrained and probed before stage 0 assembles it
(`training.tower_pretraining.PretrainSettings` fields and the probes' scene counts; only when the ablation writes the
tiny SigLIP). `detail` is the embedded default's (the tiny world with a pretrained tower and detail questions), `easy`
the tiny model with its random tower on the easy scenes, `smoke` the smallest that runs every step, `full` the recipes'
own settings (the real ablation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEDULE_DIR = Path(__file__).resolve().parent / "schedules"
STAGE_KEYS = ("all", "1", "1.5", "2")
DEFAULT_TASKS = ("manager_tiny", "manager_tiny_mc")


@dataclass(frozen=True)
class EvalSettings:
    """How each variant is evaluated: lmms-eval's batch size and document limit, extra `--model_args`."""

    batch_size: int = 1
    limit: int | None = None
    model_args: str = ""


@dataclass(frozen=True)
class Schedule:
    name: str
    description: str
    synthetic: dict[str, Any] = field(default_factory=dict)  # write_synthetic keywords (num_scenes, seed, preset)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation: EvalSettings = EvalSettings()
    tower: dict[str, Any] = field(
        default_factory=dict
    )  # PretrainSettings fields, probe_train_scenes, probe_test_scenes
    tasks: tuple[str, ...] = DEFAULT_TASKS  # lmms-eval tasks or groups

    def stage_options(self, stage: str) -> dict[str, Any]:
        """The `python -m training` options of a stage of recipe stage `stage` ("1", "1.5" or "2")."""
        return {**self.training.get("all", {}), **self.training.get(stage, {})}


def schedule_names() -> list[str]:
    """Names of the shipped schedules."""
    return sorted(path.stem for path in SCHEDULE_DIR.glob("*.yaml"))


def load_schedule(name_or_path: str | Path) -> Schedule:
    """A shipped schedule by name, or a schedule YAML file, validated."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = SCHEDULE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(
                f"unknown schedule {str(name_or_path)!r}: expected one of {schedule_names()} or a YAML file"
            )
    data = yaml.safe_load(path.read_text()) or {}
    known = {"description", "synthetic", "training", "evaluation", "tower", "tasks"}
    if not isinstance(data, dict) or set(data) - known:
        raise ValueError(f"schedule {path}: expected a mapping with keys among {sorted(known)}, got {data!r}")
    training = {str(key): dict(value or {}) for key, value in (data.get("training") or {}).items()}
    _check_training(path, training)
    synthetic = dict(data.get("synthetic") or {})
    if set(synthetic) - {"num_scenes", "seed", "preset"}:
        raise ValueError(f"schedule {path}: synthetic takes num_scenes, seed and preset, got {sorted(synthetic)}")
    evaluation = data.get("evaluation") or {}
    try:
        settings = EvalSettings(**evaluation)
    except TypeError as error:
        raise ValueError(f"schedule {path}: evaluation takes batch_size, limit, model_args ({error})") from error
    tower = dict(data.get("tower") or {})
    if tower:
        from training.tower_pretraining import PretrainSettings

        probes = {"probe_train_scenes", "probe_test_scenes"}
        if not probes <= set(tower):
            raise ValueError(f"schedule {path}: tower needs {sorted(probes)} (the probes' scene counts)")
        try:
            PretrainSettings(**{key: value for key, value in tower.items() if key not in probes})
        except TypeError as error:
            raise ValueError(
                f"schedule {path}: tower takes PretrainSettings fields and {sorted(probes)} ({error})"
            ) from error
    tasks = data.get("tasks", list(DEFAULT_TASKS))
    if not (
        isinstance(tasks, list)
        and tasks
        and all(isinstance(task, str) and re.fullmatch(r"[^,\s]+", task) for task in tasks)
    ):
        raise ValueError(f"schedule {path}: tasks must be a non-empty list of lmms-eval task names, got {tasks!r}")
    return Schedule(path.stem, str(data.get("description", "")), synthetic, training, settings, tower, tuple(tasks))


def _check_training(path: Path, training: dict[str, dict[str, Any]]) -> None:
    from training.arguments import STAGE_FIELDS, TRAINING_FIELDS

    unknown_stages = sorted(set(training) - set(STAGE_KEYS))
    if unknown_stages:
        raise ValueError(f"schedule {path}: training stages {unknown_stages}; expected some of {list(STAGE_KEYS)}")
    paths = {"recipe", "model_name_or_path", "data_path", "image_folder", "output_dir"}
    for stage, options in training.items():
        unknown = sorted(set(options) - (STAGE_FIELDS | TRAINING_FIELDS) | (set(options) & paths))
        if unknown:
            raise ValueError(
                f"schedule {path}: training.{stage} options {unknown} are not `python -m training` options "
                "(or are paths, which the ablation sets)"
            )
