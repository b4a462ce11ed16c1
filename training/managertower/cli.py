"""Command line: `llava-manager managertower-train --recipe NAME --output-dir DIR [options]` (or
`python -m training.managertower`)."""

from __future__ import annotations

import argparse
import json
import logging

from llava_manager.cli import UsageError

from .recipe import load_recipe, parse_overrides, recipe_names
from .run import deepspeed_config, run


def build_parser(prog: str = "python -m training.managertower") -> argparse.ArgumentParser:
    """The options of a ManagerTower run."""
    parser = argparse.ArgumentParser(prog=prog, description="Train and evaluate ManagerTower on one task.")
    parser.add_argument(
        "--recipe", required=True, help=f"a shipped recipe ({', '.join(recipe_names())}) or a YAML path"
    )
    parser.add_argument("--output-dir", required=True, help="checkpoints, tokenizer and eval_metrics.json go here")
    parser.add_argument("--model", help="start from this ManagerTower checkpoint (sets model.init_from)")
    parser.add_argument(
        "--synthetic", action="store_true", help="generate the task's tiny dataset and model, run offline"
    )
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --model (a checkpoint of this task)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (sets training.max_steps)")
    parser.add_argument("--deepspeed", help="zero2 or zero3 (the shipped ZeRO configs) or a DeepSpeed config path")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. training.learning_rate=2e-5",
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m training.managertower") -> dict[str, float]:
    """Train (or only evaluate) as the command line says; print and return the metrics."""
    from llava_manager.models import check_model_reference

    args = build_parser(prog).parse_args(argv)
    recipe = load_recipe(args.recipe)
    if args.model:
        check_model_reference(args.model, "--model ")
    if args.eval_only and not args.model:
        raise UsageError("--eval-only evaluates --model: give the checkpoint to evaluate")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps {args.max_steps}: expected a positive number")
    deepspeed_config(args.deepspeed)
    overrides = parse_overrides(args.set)
    if args.max_steps is not None:
        overrides.setdefault("training", {})["max_steps"] = args.max_steps
    if args.model:
        overrides.setdefault("model", {})["init_from"] = args.model
    recipe.with_overrides(overrides)  # raises on a key the recipe does not have, before anything is written
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = run(
        recipe,
        args.output_dir,
        synthetic=args.synthetic,
        overrides=overrides,
        deepspeed=args.deepspeed,
        eval_only=args.eval_only,
    )
    print(json.dumps(metrics, indent=2))
    return metrics
