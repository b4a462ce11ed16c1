"""`llava-manager data DIR [--seed S] [--num_scenes N] [--preset P]` (or `python -m training.synthetic`): write the
synthetic dataset to DIR."""

from __future__ import annotations

import argparse
import sys

from llava_manager.cli import UsageError

from .scenes import PRESETS
from .writer import write_synthetic


def main(argv: list[str] | None = None, prog: str = "python -m training.synthetic") -> None:
    """Write the synthetic dataset where the command line says."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write the synthetic LLaVA-format dataset (images, json / jsonl, mixture YAMLs) to DIR.",
    )
    parser.add_argument("directory", help="where to write images/, the json/jsonl files and the mixture YAMLs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_scenes", type=int, default=48)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="standard", help="what the scenes hold")
    args = parser.parse_args(argv)
    if args.num_scenes < 1:
        raise UsageError(f"--num_scenes {args.num_scenes}: expected at least 1")
    paths = write_synthetic(args.directory, seed=args.seed, num_scenes=args.num_scenes, preset=args.preset)
    print(f"wrote {args.num_scenes} scenes and {len(paths) - 1} data files to {args.directory}")


if __name__ == "__main__":
    from llava_manager.cli import run_main

    sys.exit(run_main(main, prog="python -m training.synthetic"))
