"""Command line: `python -m training.managertower --recipe NAME --output-dir DIR [options]`."""

from __future__ import annotations

import argparse
import json
import logging

from .recipe import load_recipe, parse_overrides, recipe_names
from .run import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.managertower", description="Train and evaluate ManagerTower on one task."
    )
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
    parser.add_argument("--deepspeed", help="zero2, zero3 (training/deepspeed/*.json) or a DeepSpeed config path")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. training.learning_rate=2e-5",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = parse_overrides(args.set)
    if args.max_steps is not None:
        overrides.setdefault("training", {})["max_steps"] = args.max_steps
    if args.model:
        overrides.setdefault("model", {})["init_from"] = args.model
    metrics = run(
        load_recipe(args.recipe),
        args.output_dir,
        synthetic=args.synthetic,
        overrides=overrides,
        deepspeed=args.deepspeed,
        eval_only=args.eval_only,
    )
    print(json.dumps(metrics, indent=2))
    return metrics
