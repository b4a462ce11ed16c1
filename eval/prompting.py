"""lmms-eval requests as model prompts: the chat template around the task's text, the images, the query tokens."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".mpeg", ".mpg")


@dataclass
class DocumentMedia:
    """What one document shows: RGB images and videos as `(frames, H, W, 3)` uint8 arrays."""

    images: list[Image.Image] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)


def request_media(visuals: Any, where: str, num_frames: int) -> DocumentMedia:
    """The images and videos of one document from what its task's `doc_to_visual` returned (None, one item, or a
    list of PIL images and video file paths); each video is `num_frames` frames sampled uniformly (lmms-eval's
    reader)."""
    media = DocumentMedia()
    if visuals is None:
        return media
    if not isinstance(visuals, Sequence) or isinstance(visuals, (str, bytes)):
        visuals = [visuals]
    for visual in visuals:
        if isinstance(visual, Image.Image):
            media.images.append(visual.convert("RGB"))
        elif isinstance(visual, (str, os.PathLike)) and Path(visual).suffix.lower() in VIDEO_SUFFIXES:
            from lmms_eval.models.model_utils.load_video import read_video

            media.videos.append(read_video(str(visual), num_frm=num_frames))
        else:
            raise TypeError(
                f"{where}: llava_ov_manager takes images and video files ({', '.join(VIDEO_SUFFIXES)}), got a "
                f"{type(visual).__name__} ({str(visual)[:80]!r}); audio is not supported"
            )
    return media


def chat_prompt(processor, text: str, num_images: int, where: str, num_videos: int = 0) -> str:
    """The model's chat template around one user turn holding `num_images` images, `num_videos` videos and `text`,
    ready to answer.

    Images go where the text places image tokens, or before the text when it places none; videos go first.
    """
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"the processor of this checkpoint has no chat template; {where} needs one")
    placed = text.count(processor.image_token)
    if placed not in (0, num_images):
        raise ValueError(f"{where}: the text places {placed} image tokens but the document has {num_images} images")
    content = [{"type": "video"}] * num_videos + [{"type": "image"}] * (num_images - placed)
    content.append({"type": "text", "text": text})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
