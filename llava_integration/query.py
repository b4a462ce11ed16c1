"""The query of the adaptive managers that read one (adaptive_last / average / cross): the user's instruction."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from jinja2 import TemplateError
from torch import nn

from .patch import RUNTIME_ATTRIBUTE, llava_model

T = TypeVar("T")


@dataclass(frozen=True)
class UserTurn:
    """How a chat template marks user turns, as token ids: what stands right before a user message (`starts`: as the
    first turn and as a later one, which byte-pair merges may spell differently) and right after it (`ends`: before the
    assistant's reply or the generation prompt)."""

    starts: tuple[tuple[int, ...], ...]
    ends: tuple[tuple[int, ...], ...]


# tokenizer -> {key: value}: what is read of a tokenizer for every sample, worked out once. Weak keys: an entry goes
# with its tokenizer, and no other tokenizer (even one later given the same id) ever reads it.
_LEARNT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def per_tokenizer(tokenizer, key: Hashable, compute: Callable[[], T]) -> T:
    """`compute()` the first time `tokenizer` is asked for `key`, the same value after (while the tokenizer lives)."""
    learnt = _LEARNT.get(tokenizer)
    if learnt is None:
        learnt = _LEARNT[tokenizer] = {}
    if key not in learnt:
        learnt[key] = compute()
    return learnt[key]


def user_turn_markers(tokenizer, chat_template: str | None = None) -> UserTurn | None:
    """The user-turn markers of `chat_template` (default: the tokenizer's) for this tokenizer; None where it has none.

    The template renders a conversation (user, assistant, user) and a single user turn with the generation prompt,
    each message being the image token (a special token: it merges with nothing, as images do in real prompts). The
    text common to what precedes the first and the later user messages is the user turn's opening (a system turn or
    BOS before the first one differ, and drop out), the text common to what follows a user message in both its
    closing; each, without the white space at its edges, is read back as the tokens that spell it in each rendering.
    None: no template, or one in which user messages leave no mark (nothing to tell a user turn from other text).
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    # The vocabulary's size in the key: added tokens change how the template's text is tokenised.
    key = ("user turn", template, len(tokenizer))
    return per_tokenizer(tokenizer, key, lambda: _learn_user_turn(tokenizer, template))


def _learn_user_turn(tokenizer, template: str) -> UserTurn | None:
    sentinel = _image_token(tokenizer)
    sentinel_id = tokenizer.convert_tokens_to_ids(sentinel)
    roles = ("user", "assistant", "user")
    for content in (sentinel, [{"type": "text", "text": sentinel}]):  # string messages, or lists of parts
        try:
            conversation = _render(tokenizer, template, [{"role": r, "content": content} for r in roles], False)
            prompt = _render(tokenizer, template, [{"role": "user", "content": content}], True)
        except TemplateError:  # the template refuses this form of message
            continue
        if _count(conversation, sentinel_id) == 3 and _count(prompt, sentinel_id) == 1:
            break
    else:  # the template drops the messages' text: it cannot say where a user turn is
        return None
    (first, reply, later), (asked,) = _sentinel_spans(conversation, sentinel_id), _sentinel_spans(prompt, sentinel_id)
    text, prompt_text = conversation["text"], prompt["text"]
    opening = _common_suffix(text[: first[0]], text[reply[1] : later[0]]).strip()
    closing = _common_prefix(text[first[1] : reply[0]], prompt_text[asked[1] :]).strip()
    if not opening or not closing:
        return None
    starts = {
        _tokens_over(conversation, at - len(opening), at)
        for at in (_strip_end(text, first[0]), _strip_end(text, later[0]))
    }
    ends = {
        _tokens_over(rendered, at, at + len(closing))
        for rendered, at in (
            (conversation, _strip_start(text, first[1])),
            (prompt, _strip_start(prompt_text, asked[1])),
        )
    }
    return UserTurn(tuple(sorted(starts)), tuple(sorted(ends)))


def _image_token(tokenizer) -> str:
    return getattr(tokenizer, "image_token", None) or "<image>"


def _render(tokenizer, template: str, messages: list[dict], generation_prompt: bool) -> dict:
    """The rendered text, its token ids and each token's character span."""
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return {"text": text, "ids": encoded["input_ids"], "offsets": encoded["offset_mapping"]}


def _count(rendered: dict, token: int) -> int:
    return rendered["ids"].count(token)


def _sentinel_spans(rendered: dict, token: int) -> list[tuple[int, int]]:
    return [span for i, span in zip(rendered["ids"], rendered["offsets"]) if i == token]


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n :]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _strip_end(text: str, at: int) -> int:
    """`at` moved back over the white space before it."""
    return len(text[:at].rstrip())


def _strip_start(text: str, at: int) -> int:
    """`at` moved forward over the white space after it."""
    return at + len(text[at:]) - len(text[at:].lstrip())


def _tokens_over(rendered: dict, begin: int, end: int) -> tuple[int, ...]:
    """The ids of the tokens that hold any character of `[begin, end)` (a merged leading space included)."""
    return tuple(i for i, (a, b) in zip(rendered["ids"], rendered["offsets"]) if a < end and b > begin)


def _media_ids(tokenizer) -> tuple[int, frozenset[int]]:
    """The image token's id (as `convert_tokens_to_ids` reads it), and the ids of the image and video tokens the
    vocabulary holds."""
    image_token = _image_token(tokenizer)
    video_token = getattr(tokenizer, "video_token", None) or "<video>"

    def look_up() -> tuple[int, frozenset[int]]:
        vocabulary = tokenizer.get_vocab()  # the whole vocabulary as a dict: too slow to build per sample
        media = frozenset(vocabulary[token] for token in (image_token, video_token) if token in vocabulary)
        return tokenizer.convert_tokens_to_ids(image_token), media

    # The vocabulary's size in the key: added tokens may give these names ids.
    return per_tokenizer(tokenizer, ("media", image_token, video_token, len(tokenizer)), look_up)


def _blank_ids(tokenizer, tokens: list[int]) -> list[int]:
    """Those of `tokens` that decode to white space only (the newline after a placeholder, say)."""
    blank = per_tokenizer(tokenizer, "blank", dict)  # token id -> bool, at most the vocabulary's size
    for token in tokens:
        if token not in blank:
            blank[token] = not tokenizer.decode([token]).strip()
    return [token for token in tokens if blank[token]]


def _matches(ids: torch.Tensor, pattern: tuple[int, ...]) -> torch.Tensor:
    """`(B, T)` bool: where `pattern` starts in each row of `ids`."""
    found = torch.zeros_like(ids, dtype=torch.bool)
    if len(pattern) <= ids.shape[1]:
        windows = ids.unfold(1, len(pattern), 1)  # (B, T - k + 1, k)
        found[:, : windows.shape[1]] = (windows == torch.tensor(pattern, device=ids.device)).all(dim=-1)
    return found


def instruction_query_mask(
    input_ids: torch.Tensor,
    tokenizer,
    attention_mask: torch.Tensor | None = None,
    chat_template: str | None = None,
) -> torch.Tensor:
    """A bool mask, shaped like `input_ids` ((T,) or (B, T)), over the instruction of the user turn holding the images.

    That is the text of the user turn of `chat_template` (the one the prompts were rendered with; default: the
    tokenizer's) that holds the first image token, from its opening to its closing (`user_turn_markers`), without the
    image and video tokens and blank tokens: ChatML, Vicuna (`USER: ... ASSISTANT:`), Mistral `[INST]` and Llama-3
    headers alike. Samples without an image, or without a user turn around it (the `plain` stage-1 prompt, whose only
    text is the caption being learnt), and every sample when there is no chat template or its user turns leave no
    mark, get an empty mask: the manager then uses the visual tokens themselves as their query.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    turn = user_turn_markers(tokenizer, chat_template)
    if turn is None:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    length = ids.shape[1]
    positions = torch.arange(length, device=ids.device)
    image_id, media = _media_ids(tokenizer)
    image = ids == image_id
    first_image = torch.where(image, positions, length).amin(dim=1, keepdim=True)
    has_image = image.any(dim=1, keepdim=True)
    # The opening nearest before the first image (its end), and the closing nearest after it.
    turn_start = torch.full_like(first_image, -1)
    for pattern in turn.starts:
        after = positions + len(pattern)  # the first position after an opening found at `positions`
        opened = _matches(ids, pattern) & (after <= first_image)
        turn_start = torch.maximum(turn_start, torch.where(opened, after, -1).amax(dim=1, keepdim=True))
    turn_end = torch.full_like(first_image, length)
    for pattern in turn.ends:
        closed = _matches(ids, pattern) & (positions > first_image)
        turn_end = torch.minimum(turn_end, torch.where(closed, positions, length).amin(dim=1, keepdim=True))

    mask = (positions >= turn_start) & (positions < turn_end) & (turn_start >= 0) & has_image
    present = torch.unique(ids).tolist()
    dropped = [token for token in present if token in media] + _blank_ids(tokenizer, present)
    mask &= ~torch.isin(ids, torch.tensor(dropped, dtype=ids.dtype, device=ids.device))
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
