"""The query of the adaptive managers that read one (adaptive_last / average / cross): the user's instruction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .patch import RUNTIME_ATTRIBUTE, llava_model

TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"


def _blank_ids(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Which ids of `input_ids` decode to white space only (the newline after a placeholder, say)."""
    unique = torch.unique(input_ids)
    blank = [not tokenizer.decode([int(token)]).strip() for token in unique]
    return unique[torch.tensor(blank, dtype=torch.bool)]


def instruction_query_mask(
    input_ids: torch.Tensor, tokenizer, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """A bool mask, shaped like `input_ids` ((T,) or (B, T)), over the instruction of the user turn holding the images.

    That is the text of the ChatML turn from the `<|im_start|>` before the first image token to the `<|im_end|>`
    after the last one, without the role name, the image tokens and blank tokens. Samples without an image, or
    without a chat turn around it (the `plain` stage-1 prompt, whose only text is the caption being learnt), get an
    empty mask; the manager then uses the visual tokens themselves as their query.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    vocabulary = tokenizer.get_vocab()
    if TURN_START not in vocabulary or TURN_END not in vocabulary:  # no ChatML turns to find the instruction in
        return torch.zeros_like(input_ids, dtype=torch.bool)
    positions = torch.arange(ids.shape[1], device=ids.device)
    length = ids.shape[1]
    image = ids == tokenizer.convert_tokens_to_ids(getattr(tokenizer, "image_token", None) or "<image>")
    first_image = torch.where(image, positions, length).amin(dim=1, keepdim=True)
    last_image = torch.where(image, positions, -1).amax(dim=1, keepdim=True)
    starts = (ids == tokenizer.convert_tokens_to_ids(TURN_START)) & (positions < first_image)
    turn_start = torch.where(starts, positions, -1).amax(dim=1, keepdim=True)
    ends = (ids == tokenizer.convert_tokens_to_ids(TURN_END)) & (positions > last_image)
    turn_end = torch.where(ends, positions, length).amin(dim=1, keepdim=True)

    mask = (positions > turn_start + 1) & (positions < turn_end)  # +1: skip `<|im_start|>` and the role name
    mask &= ~image & ~torch.isin(ids, _blank_ids(ids, tokenizer)) & (turn_start >= 0) & (last_image >= 0)
    if attention_mask is not None:
        mask &= attention_mask.view_as(ids).bool()
    return mask if input_ids.dim() == 2 else mask[0]


@contextmanager
def prompt_query(model: nn.Module, query_mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `generate`'s prefill (whole or chunked) reads `query_mask` `(B, prompt length)` as the query
    of the adaptive managers; generate cannot take it as an argument. Each chunk reads its own columns, and the
    mask is repeated for beams. None: the managers use the visual tokens as their query.
    """
    runtime = getattr(llava_model(model), RUNTIME_ATTRIBUTE, None)
    if query_mask is None or runtime is None:
        yield
        return
    runtime.prompt_query_mask = query_mask
    try:
        yield
    finally:
        runtime.prompt_query_mask = None
