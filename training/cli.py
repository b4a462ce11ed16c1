"""`python -m training --recipe NAME --model_name_or_path P --data_path D --image_folder F --output_dir O [...]`.

Any `TrainingArguments` field is an option (`--max_steps 10`, `--per_device_train_batch_size 4`, ...);
`--deepspeed zero2 | zero3 | PATH`; `--resume_from_checkpoint true | PATH`. Works under `torchrun` and the
`deepspeed` launcher.
"""

from __future__ import annotations

import argparse
import logging
import sys

from transformers import HfArgumentParser, TrainingArguments

from .arguments import StageArguments
from .recipe import load_recipe, recipe_names

EXAMPLE = (
    "example (the tiny model on the synthetic data, a few steps on CPU):\n"
    "  python -m llava_integration.tiny tiny && python -m training.synthetic data\n"
    "  python -m training --recipe stage1_manager --model_name_or_path tiny --data_path data/captions.json \\\n"
    "    --image_folder data --output_dir out/stage1_manager --global_batch_size 4 --per_device_train_batch_size 2 \\\n"
    "    --max_steps 3 --gradient_checkpointing false"
)


def recipe_listing() -> str:
    """The shipped recipes, one a line, with what each trains."""
    lines = ["recipes:"]
    for name in recipe_names():
        recipe = load_recipe(name)
        source = f" (from {recipe.starts_from})" if recipe.starts_from else ""
        lines.append(f"  {name:<26} {recipe.description}{source}")
    return "\n".join(lines)


def build_parser() -> HfArgumentParser:
    """The parser; every option defaults to 'not given', so only explicit values override the recipe."""
    parser = HfArgumentParser(
        (StageArguments, TrainingArguments),
        prog="python -m training",
        description="Train one stage of LLaVA-OneVision (+ manager) from a recipe.",
        epilog=recipe_listing() + "\n\n" + EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return parser


def parse_args(argv: list[str] | None = None) -> dict:
    """The explicitly given arguments, typed."""
    return vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None):
    """Parse the command line and run the stage."""
    from .arguments import resolve_stage
    from .run import run_stage

    values = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    setup = resolve_stage(values)
    logging.getLogger("training").setLevel(logging.INFO if setup.training.should_log else logging.WARNING)
    result = run_stage(setup)
    if setup.training.should_save:
        print(f"stage {setup.recipe.name} finished at step {result.global_step}: model in {result.output_dir}")
    return result
