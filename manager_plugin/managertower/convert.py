"""Convert the authors' ManagerTower / BridgeTower Lightning checkpoints (`.ckpt`) to HF format.

llava-manager managertower-convert CKPT DST                   # head chosen from the checkpoint's tasks
llava-manager managertower-convert CKPT DST --head base       # the bare ManagerTowerModel
llava-manager managertower-convert BT.ckpt DST --format hf-bridgetower   # HF BridgeTower classes
(or python -m manager_plugin.managertower.convert ...)

ManagerTower checkpoints become `ManagerTowerModel` or a task-head class; BridgeTower checkpoints become a
ManagerTower in `bridge` mode (every head), or with --format hf-bridgetower HF's own BridgeTower (base, MLM, ITM).
"""

from __future__ import annotations

import argparse
import sys

from .conversion import FORMATS, HEADS, convert_lightning_checkpoint


def main(argv: list[str] | None = None, prog: str = "python -m manager_plugin.managertower.convert") -> None:
    """Convert the checkpoint the command line names; one that cannot be converted is a `ConversionError`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("checkpoint", help="the Lightning .ckpt saved by the authors' code")
    parser.add_argument("destination", help="a new (or empty) directory for the result")
    parser.add_argument(
        "--head", default="auto", choices=HEADS, help="the task head to keep (default: from the checkpoint's tasks)"
    )
    parser.add_argument(
        "--format",
        dest="output_format",
        default=FORMATS[0],
        choices=FORMATS,
        help="managertower (default; BridgeTower becomes bridge mode) or hf-bridgetower (BridgeTower only)",
    )
    parser.add_argument("--image-size", type=int, help="convert to this resolution (default: the checkpoint's)")
    parser.add_argument("--hparams", help="a JSON file with the authors' config (instead of the checkpoint's)")
    parser.add_argument("--tokenizer", help="a tokenizer directory or hub name to save with the model")
    args = parser.parse_args(argv)
    result = convert_lightning_checkpoint(
        args.checkpoint,
        args.destination,
        head=args.head,
        output_format=args.output_format,
        image_size=args.image_size,
        hparams=args.hparams,
        tokenizer=args.tokenizer,
    )
    print(f"wrote {result.destination} ({result.architecture})")
    if result.dropped:
        print(f"not carried over ({len(result.dropped)} tensors): {', '.join(result.dropped)}")


if __name__ == "__main__":
    from llava_manager.cli import run_main

    sys.exit(run_main(main, prog="python -m manager_plugin.managertower.convert"))
