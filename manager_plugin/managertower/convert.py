"""Convert the authors' ManagerTower / BridgeTower Lightning checkpoints (`.ckpt`) to HF format.

python -m manager_plugin.managertower.convert CKPT DST                   # head chosen from the checkpoint's tasks
python -m manager_plugin.managertower.convert CKPT DST --head base       # the bare ManagerTowerModel
python -m manager_plugin.managertower.convert BT.ckpt DST --format hf-bridgetower   # HF BridgeTower classes

ManagerTower checkpoints become `ManagerTowerModel` or a task-head class; BridgeTower checkpoints become a
ManagerTower in `bridge` mode (every head), or with --format hf-bridgetower HF's own BridgeTower (base, MLM, ITM).
"""

from __future__ import annotations

import argparse

from .conversion import FORMATS, HEADS, ConversionError, convert_lightning_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m manager_plugin.managertower.convert",
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
    try:
        result = convert_lightning_checkpoint(
            args.checkpoint,
            args.destination,
            head=args.head,
            output_format=args.output_format,
            image_size=args.image_size,
            hparams=args.hparams,
            tokenizer=args.tokenizer,
        )
    except ConversionError as error:
        raise SystemExit(f"convert: error: {error}") from error
    print(f"wrote {result.destination} ({result.architecture})")
    if result.dropped:
        print(f"not carried over ({len(result.dropped)} tensors): {', '.join(result.dropped)}")


if __name__ == "__main__":
    main()
