"""A tiny ManagerTower and RoBERTa-style tokenizer, built offline in seconds, for tests and synthetic recipe runs.

`python -m manager_plugin.managertower.tiny DIR` writes a `ManagerTowerModel` and its processor (tokenizer and image
processor) that `from_pretrained` / `AutoProcessor.from_pretrained` load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tiny_tokenizers import train_byte_level_bpe

# Words of the synthetic datasets (shapes, colours, positions), so the tiny tokenizer keeps them whole.
CORPUS = """
a an the image picture photo shows there is are of on in at to with and left right top bottom centre middle
red green blue yellow purple orange white black circle square triangle shape shapes colour color what which
where how many one two three yes no true false both neither image contains has big small
"""
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]

TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}
TINY_VISION = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}


def build_tokenizer():
    """A byte-level BPE RoBERTa tokenizer trained on `CORPUS` (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4)."""
    from transformers import RobertaTokenizer

    words = CORPUS.split()
    vocab, merges = train_byte_level_bpe([" ".join(words)] * 4 + words, 400, SPECIAL_TOKENS)
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=64)


def tiny_config(vocab_size: int, image_size: int = 32, patch_size: int = 8, **overrides: Any):
    """A `ManagerTowerConfig` of width 32 with 3 uni-modal and 2 cross-modal layers."""
    from .configuration_managertower import ManagerTowerConfig

    settings: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "contrastive_hidden_size": 16,
        "text_config": {**TINY_TEXT, "vocab_size": vocab_size, "max_position_embeddings": 66},
        "vision_config": {**TINY_VISION, "image_size": image_size, "patch_size": patch_size},
    }
    settings.update(overrides)
    return ManagerTowerConfig(**settings)


def write_tiny(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny `ManagerTowerModel` and its processor to `directory`; return it."""
    import torch

    from .modeling_managertower import ManagerTowerModel
    from .processing_managertower import ManagerTowerProcessor, image_processor_for

    directory = Path(directory)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = ManagerTowerModel(tiny_config(len(tokenizer), **overrides))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    image_processor = image_processor_for(model.config.vision_config.image_size)
    ManagerTowerProcessor(image_processor, tokenizer).save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None, prog: str = "python -m manager_plugin.managertower.tiny") -> None:
    """Write a tiny ManagerTower to the directory the command line names."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write the tiny model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--manager-type", default="AAUE", choices=["AAUE", "SAUE", "bridge"])
    args = parser.parse_args(argv)
    print(f"wrote a tiny ManagerTower to {write_tiny(args.directory, args.seed, manager_type=args.manager_type)}")


if __name__ == "__main__":
    from llava_manager.cli import run_main

    sys.exit(run_main(main, prog="python -m manager_plugin.managertower.tiny"))
