"""Log-likelihoods of continuations after prompts, for a whole batch in one forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def append_continuations(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, continuations: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded `prompt + continuation` ids, their attention mask, and each continuation's length.

    The prompts come left-padded from the processor (images already expanded into their tokens); the continuations
    are token ids, appended after each prompt so that every continuation ends at the last position.
    """
    rows = [
        torch.cat([ids[mask.bool()], torch.as_tensor(list(continuation), dtype=ids.dtype, device=ids.device)])
        for ids, mask, continuation in zip(input_ids, attention_mask, continuations)
    ]
    length = max(row.numel() for row in rows)
    ids = input_ids.new_full((len(rows), length), pad_token_id)
    mask = attention_mask.new_zeros((len(rows), length))
    for index, row in enumerate(rows):
        ids[index, length - row.numel() :] = row
        mask[index, length - row.numel() :] = 1
    lengths = torch.tensor([len(continuation) for continuation in continuations], device=input_ids.device)
    if bool((lengths == 0).any()):
        raise ValueError("every continuation needs at least one token; got an empty one")
    return ids, mask, lengths


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` computes them."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def continuation_scores(
    logits: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's last `lengths` tokens, and whether greedy decoding would produce them.

    `logits` are the model's last `max(lengths) + 1` positions (`logits_to_keep`), `input_ids` the full batch.
    """
    window = int(lengths.max())
    predicting = logits[:, -window - 1 : -1].float()  # position t predicts token t + 1
    targets = input_ids[:, -window:]
    in_continuation = torch.arange(window, device=lengths.device) >= window - lengths[:, None]
    token_logprobs = torch.log_softmax(predicting, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    loglikelihood = torch.where(in_continuation, token_logprobs, 0.0).sum(dim=-1)
    greedy = ((predicting.argmax(dim=-1) == targets) | ~in_continuation).all(dim=-1)
    return loglikelihood, greedy
