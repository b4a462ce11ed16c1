"""The manager's text query: which tokens are the instruction of the user turn that holds the image(s).

Adaptive query managers (`adaptive_last`, `adaptive_average`, `adaptive_cross`) read these tokens through the
`manager_query_mask` forward argument; without any (plain prompts, text-only samples) the visual tokens are their own
query.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def instruction_query_mask(
    text: str,
    offsets: Sequence[tuple[int, int]],
    messages: Sequence[dict[str, str]],
    image_token: str,
) -> torch.Tensor:
    """A `(T,)` bool mask over the tokens of `text`: the non-blank, non-image tokens of each user message's content
    that contains `image_token`.

    `offsets` are the tokens' character spans in `text` (a fast tokenizer's `offset_mapping`). Message contents are
    located in the rendered `text` in order, so repeated contents resolve to the right turn; a content the chat
    template does not render verbatim contributes no query tokens.
    """
    spans = []
    cursor = 0
    for message in messages:
        content = message["content"]
        found = text.find(content, cursor) if content else -1
        if found < 0:
            continue
        cursor = found + len(content)
        if message["role"] == "user" and image_token in content:
            spans.append((found, cursor))
    mask = torch.zeros(len(offsets), dtype=torch.bool)
    if not spans:
        return mask
    starts = torch.tensor([start for start, _ in offsets])
    ends = torch.tensor([end for _, end in offsets])
    for span_start, span_end in spans:
        mask |= (starts >= span_start) & (ends <= span_end) & (ends > starts)
    # Blank tokens (the newline after a placeholder) and the image placeholders themselves are not the instruction.
    for index in mask.nonzero().flatten().tolist():
        piece = text[offsets[index][0] : offsets[index][1]]
        if not piece.strip() or image_token in piece:
            mask[index] = False
    return mask
