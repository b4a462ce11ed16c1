"""Log-likelihoods of continuations (the choices of multiple-choice tasks) after shared prompts: each prompt, with
its images and the manager's features, runs once; its KV cache serves every continuation of that prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` computes them."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def right_padded(
    continuations: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuation ids right-padded to one length, and their mask; an empty continuation is an error."""
    if any(len(continuation) == 0 for continuation in continuations):
        raise ValueError("every continuation needs at least one token; got an empty one")
    length = max(len(continuation) for continuation in continuations)
    ids = torch.full((len(continuations), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(continuations), length), dtype=torch.long)
    for row, continuation in enumerate(continuations):
        ids[row, : len(continuation)] = torch.as_tensor(list(continuation))
        mask[row, : len(continuation)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def continuation_scores(
    model: nn.Module,
    prompt_inputs: dict,
    prompt_of: Sequence[int],
    continuations: Sequence[Sequence[int]],
    pad_token_id: int,
    **prompt_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each continuation after its prompt (`prompt_of[k]`: a row of the left-padded
    `prompt_inputs`), and whether greedy decoding would produce it.

    One forward encodes the prompts (images included) into a KV cache; the cache is repeated per continuation and one
    more forward scores every continuation token. Causal attention makes this equal to scoring each prompt +
    continuation from scratch; right padding of the continuations touches no real token.
    """
    prompt_mask = prompt_inputs["attention_mask"]
    prompt = model(
        **prompt_inputs,
        **prompt_kwargs,
        position_ids=positions_from_mask(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    index = torch.as_tensor(list(prompt_of), device=prompt_mask.device)
    cache = prompt.cache
    cache.reorder_cache(index)  # one copy of each prompt's keys and values per continuation
    ids, mask = right_padded(continuations, pad_token_id, prompt_mask.device)
    positions = prompt_mask.sum(dim=1, keepdim=True)[index] + torch.arange(ids.shape[1], device=ids.device)
    logits = model(
        input_ids=ids,
        attention_mask=torch.cat([prompt_mask[index], mask.to(prompt_mask.dtype)], dim=1),
        position_ids=positions,
        cache=cache,
        use_cache=True,
    ).logits
    # The prompt's last position predicts each continuation's first token; continuation token t predicts t + 1.
    predicting = torch.cat([prompt.logits[index, -1:], logits[:, :-1]], dim=1).float()
    token_logprobs = torch.log_softmax(predicting, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    valid = mask.bool()
    loglikelihood = torch.where(valid, token_logprobs, 0.0).sum(dim=-1)
    greedy = ((predicting.argmax(dim=-1) == ids) | ~valid).all(dim=-1)
    return loglikelihood, greedy
