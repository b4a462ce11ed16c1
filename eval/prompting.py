"""lmms-eval requests as model prompts: the chat template around the task's text, the images, the query tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image


def request_images(visuals: Any, where: str) -> list[Image.Image]:
    """The RGB images of one document from what its task's `doc_to_visual` returned (None, one image, or a list)."""
    if visuals is None:
        return []
    if not isinstance(visuals, Sequence) or isinstance(visuals, (str, bytes)):
        visuals = [visuals]
    images = []
    for visual in visuals:
        if not isinstance(visual, Image.Image):
            raise TypeError(
                f"{where}: llava_ov_manager takes images, got a {type(visual).__name__} ({str(visual)[:80]!r}); "
                "videos and audio are not supported"
            )
        images.append(visual.convert("RGB"))
    return images


def chat_prompt(processor, text: str, num_images: int, where: str) -> str:
    """The model's chat template around one user turn holding `num_images` images and `text`, ready to answer.

    Images go where the text places image tokens, or before the text when it places none.
    """
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"the processor of this checkpoint has no chat template; {where} needs one")
    placed = text.count(processor.image_token)
    if placed not in (0, num_images):
        raise ValueError(f"{where}: the text places {placed} image tokens but the document has {num_images} images")
    content = [{"type": "image"}] * (num_images - placed) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
