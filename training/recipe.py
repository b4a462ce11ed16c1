"""Recipes: what one training stage trains, as data. One YAML per recipe in `recipes/`, loaded into `Recipe`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from llava_integration.image_modes import is_image_mode

RECIPE_DIR = Path(__file__).parent / "recipes"
# The parts of the model a recipe can train; `model_setup.PARTS` says which parameters each one holds.
PART_NAMES = ("vision_tower", "projector", "manager", "language_model")
TEMPLATE_NAMES = ("plain", "chat")


class RecipeError(ValueError):
    """A recipe file that does not describe a valid stage."""


@dataclass(frozen=True)
class Recipe:
    """One training stage: data template, image handling, trainable parts, learning rates and defaults."""

    name: str
    description: str
    stage: str
    starts_from: str | None
    data: str
    template: str
    image_aspect_ratio: str
    grid_shapes: tuple[tuple[int, int], ...] | None
    trainable: tuple[str, ...]
    learning_rates: dict[str, float]
    manager: dict[str, Any] | None
    model_max_length: int
    global_batch_size: int
    group_by_modality_length: bool
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def learning_rate(self) -> float:
        return float(self.training["learning_rate"])

    def part_learning_rate(self, part: str) -> float:
        """The learning rate of `part`: its own entry, else the base `training.learning_rate`."""
        return float(self.learning_rates.get(part, self.learning_rate))

    def grid_pinpoints(self, tower_image_size: int) -> list[list[int]] | None:
        """The AnyRes candidate resolutions `[height, width]` in pixels for a tower of `tower_image_size` px."""
        if self.grid_shapes is None:
            return None
        return [[rows * tower_image_size, cols * tower_image_size] for rows, cols in self.grid_shapes]


def recipe_names() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """The YAML file of a shipped recipe name, or `name_or_path` itself when it is a file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise RecipeError(f"unknown recipe {str(name_or_path)!r}: expected one of {recipe_names()} or a recipe YAML file")


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe by name (see `recipe_names()`) or from a YAML file."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must hold a mapping of fields, got {type(data).__name__}")
    return _build(path, data)


def _build(path: Path, data: dict[str, Any]) -> Recipe:
    known = {f.name for f in fields(Recipe)} - {"name"}
    unknown = sorted(set(data) - known)
    missing = sorted(known - set(data) - {"training"})
    if unknown or missing:
        raise RecipeError(f"recipe {path}: unknown fields {unknown}, missing fields {missing}")

    def fail(message: str) -> RecipeError:
        return RecipeError(f"recipe {path}: {message}")

    if data["template"] not in TEMPLATE_NAMES:
        raise fail(f"template {data['template']!r} is not one of {list(TEMPLATE_NAMES)}")
    aspect = data["image_aspect_ratio"]
    if not is_image_mode(aspect):
        raise fail(f"image_aspect_ratio {aspect!r}: expected 'square' or 'anyres_max_<N>'")
    shapes = data["grid_shapes"]
    if (aspect == "square") != (shapes is None):
        raise fail(
            f"grid_shapes must be given exactly for AnyRes recipes (image_aspect_ratio {aspect!r}, got {shapes})"
        )
    if shapes is not None:
        if not shapes or not all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in shapes
        ):
            raise fail(f"grid_shapes must be a non-empty list of [rows, cols] positive ints, got {shapes}")
        shapes = tuple(tuple(s) for s in shapes)

    trainable = data["trainable"]
    if not isinstance(trainable, list) or not trainable or not set(trainable) <= set(PART_NAMES):
        raise fail(f"trainable {trainable!r}: expected a non-empty subset of {list(PART_NAMES)}")
    manager = data["manager"]
    if manager is not None:
        from manager_plugin import ManagerConfig

        if not isinstance(manager, dict):
            raise fail(f"manager must be a mapping of ManagerConfig fields or null, got {manager!r}")
        ManagerConfig.from_dict(manager)  # validates names and values now, not at the first forward
    if (manager is not None) != ("manager" in trainable):
        raise fail(
            f"a recipe with a manager must train it and one without must not (manager {manager}, trainable {trainable})"
        )
    rates = data["learning_rates"] or {}
    if not isinstance(rates, dict) or not set(rates) <= set(trainable):
        raise fail(f"learning_rates {rates!r}: keys must be trainable parts {trainable}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in rates.values()):
        raise fail(f"learning_rates {rates!r} must be positive numbers")

    training = dict(data.get("training") or {})
    from transformers import TrainingArguments

    allowed = {f.name for f in fields(TrainingArguments)}
    bad = sorted(set(training) - allowed)
    if bad:
        raise fail(f"training holds {bad}, which are not TrainingArguments fields")
    if "learning_rate" not in training:
        raise fail("training.learning_rate is required (the rate of every part without its own entry)")
    for key in ("model_max_length", "global_batch_size"):
        if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] <= 0:
            raise fail(f"{key} must be a positive int, got {data[key]!r}")
    starts_from = data["starts_from"]
    if starts_from is not None and starts_from not in recipe_names():
        raise fail(f"starts_from {starts_from!r} is not a recipe: expected one of {recipe_names()} or null")

    return Recipe(
        name=path.stem,
        description=str(data["description"]),
        stage=str(data["stage"]),
        starts_from=starts_from,
        data=str(data["data"]),
        template=data["template"],
        image_aspect_ratio=aspect,
        grid_shapes=shapes,
        trainable=tuple(trainable),
        learning_rates={k: float(v) for k, v in rates.items()},
        manager=dict(manager) if manager is not None else None,
        model_max_length=data["model_max_length"],
        global_batch_size=data["global_batch_size"],
        group_by_modality_length=bool(data["group_by_modality_length"]),
        training=training,
    )
