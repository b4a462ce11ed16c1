"""Convert checkpoints between LLaVA-NeXT's format and HF LLaVA-OneVision + manager adapter.

llava-manager convert SRC DST                    # LLaVA-NeXT -> HF (+ adapter for manager models)
llava-manager convert --to-llava-next SRC DST    # HF (+ adapter or merged) -> LLaVA-NeXT
(or python -m llava_integration.convert ...)
"""

from __future__ import annotations

import argparse
import sys

from .conversion import convert_hf_to_llava_next, convert_llava_next_to_hf


def main(argv: list[str] | None = None, prog: str = "python -m llava_integration.convert") -> None:
    """Convert as the command line says; a checkpoint that cannot be converted is a `ConversionError`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("source", help="the checkpoint directory to convert")
    parser.add_argument("destination", help="a new (or empty) directory for the result")
    parser.add_argument(
        "--to-llava-next", action="store_true", help="convert an HF model (+ manager) to LLaVA-NeXT's format"
    )
    parser.add_argument(
        "--vision-tower",
        help="LLaVA-NeXT -> HF: a SigLIP directory or config.json giving the tower's architecture (default: from "
        "mm_vision_tower); --to-llava-next: the mm_vision_tower to write (default: the known tower that matches)",
    )
    parser.add_argument("--tokenizer", help="LLaVA-NeXT -> HF: where the tokenizer is, if not saved in SRC")
    parser.add_argument("--manager", help="--to-llava-next: a manager adapter directory (default: one inside SRC)")
    args = parser.parse_args(argv)
    if args.to_llava_next:
        if args.tokenizer:
            parser.error("--tokenizer applies to LLaVA-NeXT -> HF only")
        written = convert_hf_to_llava_next(
            args.source, args.destination, manager=args.manager, vision_tower=args.vision_tower
        )
    else:
        if args.manager:
            parser.error("--manager applies to --to-llava-next only")
        written = convert_llava_next_to_hf(
            args.source, args.destination, vision_tower=args.vision_tower, tokenizer=args.tokenizer
        )
    print(f"wrote {written}")


if __name__ == "__main__":
    from llava_manager.cli import run_main

    sys.exit(run_main(main, prog="python -m llava_integration.convert"))
