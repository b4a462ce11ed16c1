"""Prompt templates: a record becomes text with one image placeholder per image, its token ids, the tokens the loss
is on, and the manager's query tokens. Token ids here hold ONE image token per image; the collator expands them.

- `plain` (stage 1): `<image>` per image, then the caption (the gpt turn) and a newline; the loss is on the caption.
- `chat` (stages 1.5, 2): the model's own chat template (Qwen ChatML for LLaVA-OneVision, `USER: ... ASSISTANT:`
  for LLaVA-1.5, ...); the loss is on the assistant turns, found by the template's `{% generation %}` blocks when
  it has them, else by the ChatML pattern `<|im_start|>assistant\\n ... <|im_end|>`, else by rendering the
  conversation up to each assistant turn (what the template adds for that turn is the turn).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llava_integration.query import instruction_query_mask, per_tokenizer

from .records import IMAGE_PLACEHOLDER, ROLES, Record

_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
CHATML_ASSISTANT_HEADER = "<|im_start|>assistant\n"
CHATML_END = "<|im_end|>"


@dataclass
class Encoded:
    """A templated record: `text` and its `(T,)` token ids with bool masks of loss and query tokens."""

    text: str
    input_ids: torch.Tensor
    target_mask: torch.Tensor
    query_mask: torch.Tensor


def messages_of(record: Record, image_token: str) -> list[dict[str, str]]:
    """The record's turns as chat messages; a record with images but no placeholder gets them before its first
    user turn (as LLaVA does); placeholders are spelled as the processor's image token."""
    messages = [
        {"role": ROLES[role], "content": text.replace(IMAGE_PLACEHOLDER, image_token)} for role, text in record.turns
    ]
    if record.images and record.num_placeholders == 0:
        first_user = next(i for i, message in enumerate(messages) if message["role"] == "user")
        prefix = (image_token + "\n") * len(record.images)
        messages[first_user] = {"role": "user", "content": prefix + messages[first_user]["content"]}
    return messages


class PlainTemplate:
    """Stage-1 alignment: the image tokens, then the caption; no roles, no system prompt."""

    name = "plain"

    def render(self, record: Record, processor) -> str:
        caption = next(text for role, text in record.turns if ROLES[role] == "assistant")
        return processor.image_token * len(record.images) + caption + "\n"

    def encode(self, record: Record, processor) -> Encoded:
        text = self.render(record, processor)
        ids = torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        return Encoded(text, ids, ids != processor.image_token_id, torch.zeros_like(ids, dtype=torch.bool))


def chatml_assistant_mask(input_ids: torch.Tensor, header_ids: list[int], end_id: int) -> torch.Tensor:
    """Tokens of each assistant turn: after `header_ids` up to and including the next `end_id` (or to the end)."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    width = len(header_ids)
    if input_ids.numel() < width:
        return mask
    windows = input_ids.unfold(0, width, 1)
    starts = ((windows == torch.tensor(header_ids)).all(dim=1).nonzero().flatten() + width).tolist()
    ends = (input_ids == end_id).nonzero().flatten()
    for start in starts:
        later = ends[ends >= start]
        mask[start : int(later[0]) + 1 if later.numel() else input_ids.numel()] = True
    return mask


def _chatml_ids(tokenizer) -> tuple[list[int], int]:
    """The ids of the ChatML assistant header and of its end token (the vocabulary's size in the key: added tokens
    may change them)."""

    def tokenise() -> tuple[list[int], int]:
        header = tokenizer(CHATML_ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
        return header, tokenizer.convert_tokens_to_ids(CHATML_END)

    return per_tokenizer(tokenizer, ("chatml", len(tokenizer)), tokenise)


def rendered_assistant_spans(
    messages: list[dict[str, str]], tokenizer, template: str, text: str, where: str
) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text`: what the template adds between the conversation up to a
    turn (with the generation prompt) and the conversation including it, without trailing white space."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:index], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(messages[: index + 1], chat_template=template, tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"{where}: the chat template renders earlier turns differently once later turns follow, so the "
                "assistant turns cannot be found: give it {% generation %} blocks"
            )
        spans.append((len(before), len(through.rstrip())))  # not the white space that separates turns
    return spans


class ChatTemplate:
    """Stages 1.5 and 2: the processor's chat template; loss on the assistant turns."""

    name = "chat"

    def render(self, record: Record, processor) -> str:
        return processor.tokenizer.apply_chat_template(
            messages_of(record, processor.image_token), chat_template=self._template(processor), tokenize=False
        )

    def encode(self, record: Record, processor) -> Encoded:
        tokenizer = processor.tokenizer
        template = self._template(processor)
        messages = messages_of(record, processor.image_token)
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        if _GENERATION_BLOCK.search(template):
            # `text` rendered again with the turns' spans and tokenised once, with its mask (the collator checks
            # these ids against the processor's tokens of `text`).
            marked = tokenizer.apply_chat_template(
                messages, chat_template=template, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = torch.tensor(marked["input_ids"], dtype=torch.long)
            target = torch.tensor(marked["assistant_masks"], dtype=torch.bool)
        else:
            encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
            if CHATML_END in template:
                target = chatml_assistant_mask(ids, *_chatml_ids(tokenizer))
            else:
                spans = rendered_assistant_spans(messages, tokenizer, template, text, record.where)
                starts = torch.tensor([start for start, _ in encoding["offset_mapping"]])
                target = torch.zeros_like(ids, dtype=torch.bool)
                for begin, end in spans:
                    target |= (starts >= begin) & (starts < end)
        query = instruction_query_mask(ids, tokenizer, chat_template=template)
        return Encoded(text, ids, target, query)

    @staticmethod
    def _template(processor) -> str:
        template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("the chat template (stages 1.5 and 2) needs a processor or tokenizer with a chat_template")
        return template


TEMPLATES = {template.name: template for template in (PlainTemplate(), ChatTemplate())}


def get_template(name: str):
    """The template registered as `name`."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}: expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]
