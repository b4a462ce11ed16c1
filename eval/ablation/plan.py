"""The ablation as data: each variant's final recipe, and the stage runs its recipe chain needs (shared ones once).

A variant names only its stage-2 recipe; the recipe's `starts_from` names the stage before it, back to a stage-1
recipe that starts from the base model. Stage 1 is thus shared by Baseline and +Grid, and by the two manager arms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from training.recipe import load_recipe

# variant (as the report names it, see eval/benchmarks.yaml) -> the recipe of its last stage
VARIANT_RECIPES: dict[str, str] = {
    "baseline": "stage2_nogrid",
    "manager": "stage2_manager_nogrid",
    "grid": "stage2",
    "grid_manager": "stage2_manager",
}


@dataclass(frozen=True)
class StageRun:
    """One training run: `recipe`, started from the output of `parent` (a recipe) or, when None, the base model."""

    recipe: str
    parent: str | None
    stage: str  # the recipe's stage, "1", "1.5" or "2": which data mixture it trains on
    variants: tuple[str, ...]  # the variants whose chain holds this run


@dataclass(frozen=True)
class EvalRun:
    """One evaluation: the output of `recipe` (a variant's last stage), with AnyRes grids or square images."""

    variant: str
    recipe: str
    grid: bool


@dataclass(frozen=True)
class Plan:
    """The stage runs in an order where each parent comes first, and one evaluation per variant."""

    stages: tuple[StageRun, ...]
    evaluations: tuple[EvalRun, ...]


def recipe_chain(recipe: str) -> list[str]:
    """`recipe` and the recipes it starts from, first stage first."""
    chain = [recipe]
    while (parent := load_recipe(chain[-1]).starts_from) is not None:
        if parent in chain:
            raise ValueError(f"recipe {recipe}: its starts_from chain loops ({' -> '.join([*chain, parent])})")
        chain.append(parent)
    return chain[::-1]


def build_plan(variants: Mapping[str, str] = VARIANT_RECIPES) -> Plan:
    """The stage runs of every variant's chain (each once), stage by stage, variants in the given order."""
    if not variants:
        raise ValueError("no variants to run: expected some of " + ", ".join(VARIANT_RECIPES))
    runs: dict[str, dict] = {}
    for variant, final in variants.items():
        chain = recipe_chain(final)
        for depth, recipe in enumerate(chain):
            run = runs.setdefault(
                recipe, {"parent": chain[depth - 1] if depth else None, "depth": depth, "variants": []}
            )
            run["variants"].append(variant)
    order = sorted(runs, key=lambda recipe: runs[recipe]["depth"])  # stable: variants' order within a depth
    stages = tuple(
        StageRun(recipe, runs[recipe]["parent"], load_recipe(recipe).stage, tuple(runs[recipe]["variants"]))
        for recipe in order
    )
    evaluations = tuple(
        EvalRun(variant, final, load_recipe(final).image_aspect_ratio != "square")
        for variant, final in variants.items()
    )
    return Plan(stages, evaluations)
