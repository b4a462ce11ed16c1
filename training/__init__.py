"""Staged training of LLaVA-OneVision with the manager: recipes (what) as YAML, components (how) in small files.

Programmatic use: `train_stage("stage1_manager", model_name_or_path=..., data_path=..., image_folder=...,
output_dir=..., max_steps=3)` returns a `StageResult`; its `output_dir` is the next stage's `model_name_or_path`.
Names are imported on first use, so `training.synthetic` and `training.recipe` stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PART_NAMES": "recipe",
    "Recipe": "recipe",
    "RecipeError": "recipe",
    "load_recipe": "recipe",
    "recipe_names": "recipe",
    "StageArguments": "arguments",
    "StageSetup": "arguments",
    "resolve_stage": "arguments",
    "StageResult": "run",
    "run_stage": "run",
    "train_stage": "run",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
