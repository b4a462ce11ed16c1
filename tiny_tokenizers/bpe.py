"""Byte-level BPE vocabularies trained offline in milliseconds, for the tiny models' tokenizers (no hub download)."""

from __future__ import annotations

import json
from collections.abc import Iterable


def train_byte_level_bpe(
    lines: Iterable[str], vocab_size: int, special_tokens: list[str], split_pattern: str | None = None
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of a byte-level BPE trained on `lines` (`special_tokens` first, ids from 0).

    `split_pattern`: a regex that splits text before the byte-level step (Qwen2's pre-tokenizer); without it, text is
    split by the byte-level pre-tokenizer's own pattern (RoBERTa's, GPT-2's)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    if split_pattern is None:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=special_tokens,
    )
    bpe.train_from_iterator(lines, trainer=trainer)
    merges = [tuple(merge) for merge in json.loads(bpe.to_str())["model"]["merges"]]
    return bpe.get_vocab(), merges
