"""`python -m training.synthetic DIR [--seed S] [--num_scenes N] [--preset P]`: write the synthetic dataset to DIR."""

from __future__ import annotations

import argparse

from .scenes import PRESETS
from .writer import write_synthetic


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.synthetic",
        description="Write the synthetic LLaVA-format dataset (images, json / jsonl, mixture YAMLs) to DIR.",
    )
    parser.add_argument("directory", help="where to write images/, the json/jsonl files and the mixture YAMLs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_scenes", type=int, default=48)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="standard", help="what the scenes hold")
    args = parser.parse_args(argv)
    paths = write_synthetic(args.directory, seed=args.seed, num_scenes=args.num_scenes, preset=args.preset)
    print(f"wrote {args.num_scenes} scenes and {len(paths) - 1} data files to {args.directory}")


if __name__ == "__main__":
    main()
