"""lmms-eval's per-task generation settings (`generation_kwargs`) as HF `generate` arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loguru import logger

DEFAULT_MAX_NEW_TOKENS = 1024
# Keys lmms-eval tasks set that only concern other backends; anything else unknown is reported once.
IGNORED_KEYS = frozenset({"image_aspect_ratio", "max_length"})
_reported: set[str] = set()


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy or sampled decoding for one group of requests, and the strings that end an answer."""

    max_new_tokens: int
    do_sample: bool
    temperature: float | None
    top_p: float | None
    num_beams: int
    until: tuple[str, ...]

    @classmethod
    def from_task(cls, gen_kwargs: dict[str, Any] | None, max_new_tokens_cap: int | None) -> GenerationSettings:
        """Settings from a task's `generation_kwargs`; `max_new_tokens_cap` bounds the task's own length."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", ())
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new_tokens = int(kwargs.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        if max_new_tokens_cap is not None:
            max_new_tokens = min(max_new_tokens, max_new_tokens_cap)
        temperature = float(kwargs.pop("temperature", 0) or 0)
        do_sample = bool(kwargs.pop("do_sample", False)) or temperature > 0
        top_p = kwargs.pop("top_p", None)
        num_beams = int(kwargs.pop("num_beams", 1) or 1)
        unknown = sorted(set(kwargs) - IGNORED_KEYS - _reported)
        if unknown:
            _reported.update(unknown)
            logger.warning(f"llava_ov_manager ignores these generation_kwargs of the task: {unknown}")
        return cls(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=float(top_p) if do_sample and top_p is not None else None,
            num_beams=num_beams,
            until=tuple(stop for stop in until if stop),
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `model.generate` (sampling knobs only when sampling)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
        }
        if self.do_sample:
            kwargs["temperature"] = self.temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        return kwargs

    def cut(self, text: str) -> str:
        """`text` up to the first stop string."""
        for stop in self.until:
            text = text.split(stop, 1)[0]
        return text
