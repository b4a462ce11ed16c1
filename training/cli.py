"""`llava-manager train --recipe NAME --model_name_or_path P --data_path D --image_folder F --output_dir O [...]`
(or `python -m training ...`).

Any `TrainingArguments` field is an option (`--max_steps 10`, `--per_device_train_batch_size 4`, ...);
`--deepspeed zero2 | zero3 | PATH`; `--resume_from_checkpoint true | PATH`. Works under `torchrun` and the
`deepspeed` launcher.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .paths import check_paths  # light: the recipes and the model libraries are imported after the paths are checked

EXAMPLE = (
    "example (the tiny model on the synthetic data, a few steps on CPU):\n"
    "  llava-manager tiny tiny && llava-manager data data --preset easy\n"
    "  {prog} --recipe stage1_manager --model_name_or_path tiny --data_path data/stage1.yaml \\\n"
    "    --image_folder data --output_dir out/stage1_manager --global_batch_size 4 --per_device_train_batch_size 2 \\\n"
    "    --max_steps 3 --activation_checkpointing false"
)
OPTION_HELP = {
    "deepspeed": "zero2 or zero3 (the shipped ZeRO configs, no optimizer section so the per-part learning rates "
    "apply), the path of a DeepSpeed JSON config, or none",
    "resume_from_checkpoint": "true: the last OUTPUT_DIR/checkpoint-N; or a checkpoint directory",
}


def recipe_listing() -> str:
    """The shipped recipes, one a line, with what each trains."""
    from .recipe import load_recipe, recipe_names

    lines = ["recipes:"]
    for name in recipe_names():
        recipe = load_recipe(name)
        source = f" (from {recipe.starts_from})" if recipe.starts_from else ""
        lines.append(f"  {name:<26} {recipe.description}{source}")
    return "\n".join(lines)


def build_parser(prog: str = "python -m training"):
    """The parser; every option defaults to 'not given', so only explicit values override the recipe."""
    from transformers import HfArgumentParser, TrainingArguments

    from .arguments import StageArguments

    parser = HfArgumentParser(
        (StageArguments, TrainingArguments),
        prog=prog,
        description="Train one stage of LLaVA-OneVision (+ manager) from a recipe.",
        epilog=recipe_listing() + "\n\n" + EXAMPLE.format(prog=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
        if action.dest in OPTION_HELP:
            action.help = OPTION_HELP[action.dest]
    return parser


def check_paths_early(argv: list[str]) -> None:
    """The model, data and image folder of `argv`, checked before the model libraries load (seconds)."""
    parser = argparse.ArgumentParser(add_help=False)
    for name in ("--model_name_or_path", "--data_path", "--image_folder"):
        parser.add_argument(name, name.replace("_", "-"))
    given, _ = parser.parse_known_args(argv)
    if given.model_name_or_path is not None and given.data_path is not None:
        check_paths(given.model_name_or_path, given.data_path, given.image_folder)


def parse_args(argv: list[str] | None = None, prog: str = "python -m training") -> dict:
    """The explicitly given arguments, typed."""
    return vars(build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None, prog: str = "python -m training"):
    """Parse the command line and run the stage."""
    argv = sys.argv[1:] if argv is None else argv
    if not {"-h", "--help"} & set(argv):
        check_paths_early(argv)
    from .arguments import resolve_stage
    from .run import run_stage

    values = parse_args(argv, prog)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    setup = resolve_stage(values)
    logging.getLogger("training").setLevel(logging.INFO if setup.training.should_log else logging.WARNING)
    result = run_stage(setup)
    if setup.training.should_save:
        print(f"stage {setup.recipe.name} finished at step {result.global_step}: model in {result.output_dir}")
    return result
