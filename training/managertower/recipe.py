"""ManagerTower recipes: what one run trains and evaluates, as data. One YAML per task in `recipes/`."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from manager_plugin.managertower import TASK_HEADS

from .transforms import TRANSFORMS

RECIPE_DIR = Path(__file__).parent / "recipes"
DATA_FORMATS = ("arrow", "json")
_SECTION_KEYS = {
    "model": {"init_from", "text_encoder", "vision_encoder", "tokenizer", "config", "head"},
    "data": {
        "format",
        "root",
        "image_root",
        "train",
        "eval",
        "image_size",
        "max_text_len",
        "train_transform",
        "eval_transform",
        "mlm_probability",
    },
    "optim": {"lr_multipliers", "no_decay"},
    "evaluation": {"batch_size", "k_test"},
    "synthetic": {"num_images", "overrides"},
}


class RecipeError(ValueError):
    """A recipe that does not describe a valid run."""


@dataclass(frozen=True)
class ManagerTowerRecipe:
    """One task's training and evaluation: model start, data, optimiser multipliers, Trainer arguments."""

    name: str
    description: str
    task: str
    model: dict[str, Any]
    data: dict[str, Any]
    optim: dict[str, Any]
    training: dict[str, Any]
    evaluation: dict[str, Any]
    synthetic: dict[str, Any]

    def __post_init__(self) -> None:
        if self.task not in TASK_HEADS:
            raise RecipeError(f"recipe {self.name!r}: unknown task {self.task!r}, expected one of {sorted(TASK_HEADS)}")
        for section, allowed in _SECTION_KEYS.items():
            unknown = sorted(set(getattr(self, section)) - allowed)
            if unknown:
                raise RecipeError(
                    f"recipe {self.name!r}: unknown {section} keys {unknown}, expected some of {sorted(allowed)}"
                )
        data = self.data
        for key in ("format", "train", "eval", "image_size", "max_text_len", "train_transform", "eval_transform"):
            if key not in data:
                raise RecipeError(f"recipe {self.name!r}: data.{key} is required")
        if data["format"] not in DATA_FORMATS:
            raise RecipeError(f"recipe {self.name!r}: data.format {data['format']!r}, expected one of {DATA_FORMATS}")
        for key in ("train_transform", "eval_transform"):
            if data[key] not in TRANSFORMS:
                raise RecipeError(
                    f"recipe {self.name!r}: data.{key} {data[key]!r}, expected one of {sorted(TRANSFORMS)}"
                )
        for key in ("learning_rate", "global_batch_size", "per_device_train_batch_size"):
            if key not in self.training:
                raise RecipeError(f"recipe {self.name!r}: training.{key} is required")

    def with_overrides(self, overrides: Mapping[str, Any]) -> ManagerTowerRecipe:
        """A copy with `overrides` (nested sections, e.g. `{"training": {"max_steps": 2}}`) merged in."""
        merged = _merge({field.name: getattr(self, field.name) for field in fields(self)}, overrides)
        return ManagerTowerRecipe(**merged)

    def for_synthetic(self, data_root: str | Path, overrides: Mapping[str, Any] | None = None) -> ManagerTowerRecipe:
        """This recipe on its generated tiny dataset under `data_root`, with a tiny model and tokenizer built from
        scratch: `synthetic.overrides` apply first, then `overrides` (the command line's)."""
        scratch = {"model": {"init_from": None, "text_encoder": None, "vision_encoder": None, "tokenizer": None}}
        recipe = self.with_overrides(self.synthetic.get("overrides", {})).with_overrides(scratch)
        recipe = recipe.with_overrides(overrides or {})
        suffix = ".json" if recipe.data["format"] == "json" else ""
        data = {"root": str(data_root), "train": [f"{self.task}_train{suffix}"], "eval": [f"{self.task}_eval{suffix}"]}
        return recipe.with_overrides({"data": data})


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """`["training.max_steps=2", "model.config.manager_type=SAUE"]` -> nested overrides (values read as YAML)."""
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {assignment!r} is not KEY=VALUE (e.g. training.max_steps=2)")
        *parents, leaf = key.split(".")
        node = overrides
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = _parse_value(value)
    return overrides


def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "2e-5" (no dot) as a string
        except ValueError:
            return value
    return value


def recipe_names() -> list[str]:
    """The shipped recipes."""
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> ManagerTowerRecipe:
    """A shipped recipe by name, or a recipe YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise RecipeError(f"no recipe {name_or_path!r}: the shipped recipes are {recipe_names()}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping")
    known = {field.name for field in fields(ManagerTowerRecipe)} - {"name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{path}: unknown sections {unknown}, expected some of {sorted(known)}")
    sections = {key: data.get(key, {}) for key in known - {"description", "task"}}
    return ManagerTowerRecipe(
        name=path.stem, description=data.get("description", ""), task=data.get("task", ""), **sections
    )
