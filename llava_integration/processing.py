"""Model inputs from text and images: HF's processor (AnyRes grids, or the one image mode of LLaVA-1.5 and NeXT), and
LLaVA-OneVision's square images (base view only)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial

from PIL import Image
from transformers import BatchFeature

from .image_modes import SQUARE


def image_tokens_per_square_image(processor) -> int:
    tokens = processor.num_image_tokens
    return tokens - 1 if processor.vision_feature_select_strategy == "default" else tokens


def use_image_mode(processor, image_aspect_ratio: str | None) -> None:
    """Make a LLaVA-OneVision processor expand and count `<image>` for an AnyRes `image_aspect_ratio`.

    Square images are expanded by `prepare_inputs` itself, and None (the one image mode of LLaVA-1.5 and NeXT
    processors) needs nothing."""
    if image_aspect_ratio not in (None, SQUARE):
        processor.vision_aspect_ratio = image_aspect_ratio


def image_mode_of(model) -> str | None:
    """The image mode inputs for `model` need: LLaVA-OneVision's `vision_aspect_ratio`, None for the other families."""
    from .families import family_of

    return model.config.vision_aspect_ratio if family_of(model)[0].square_images else None


def prepare_inputs(
    processor,
    text: Sequence[str],
    images: Sequence[Sequence[Image.Image]] | None,
    image_aspect_ratio: str | None,
    videos: Sequence[Sequence] | None = None,
    **tokenizer_kwargs,
) -> BatchFeature:
    """Tokenised `text` (one `<image>` per image, one `<video>` per video) with pixel values, as the model expects
    in `image_aspect_ratio`.

    `images` and `videos` hold one list per text (empty for samples without). With "square" each image is resized
    to the tower's input size and becomes its base view's tokens, with no grid and no newline token. None: the
    processor's own (and only) image mode, for LLaVA-1.5 and LLaVA-NeXT (`image_mode_of(model)` says which).
    Videos (frames as arrays or images) are the processor's in every mode.
    """
    tokenizer_kwargs.setdefault("padding", True)
    tokenizer_kwargs.setdefault("return_tensors", "pt")
    has_images = images is not None and any(len(group) for group in images)
    flat_videos = [video for group in videos or [] for video in group] or None
    if image_aspect_ratio != SQUARE:
        if not has_images and flat_videos is None:
            return BatchFeature(dict(processor.tokenizer(list(text), **tokenizer_kwargs)))
        use_image_mode(processor, image_aspect_ratio)
        # OneVision reads the per-sample grouping (an image of a multi-image sample keeps its base view only); the
        # other processors take the images in placeholder order.
        grouped = [list(group) for group in images] if image_aspect_ratio is not None else None
        flat = (grouped or [image for group in images for image in group]) if has_images else None
        return processor(text=list(text), images=flat, videos=flat_videos, **tokenizer_kwargs)

    image_token = processor.image_token
    expanded = [sample.replace(image_token, image_token * image_tokens_per_square_image(processor)) for sample in text]
    videos_in = None
    if flat_videos is not None:  # each video's tokens as the processor counts them, in placeholder order
        videos_in = processor.video_processor(flat_videos, return_tensors=tokenizer_kwargs["return_tensors"])
        index = iter(range(len(flat_videos)))
        video_token = re.escape(processor.video_token)
        expand = partial(re.sub, video_token, lambda _: processor.replace_video_token(videos_in, next(index)))
        expanded = [expand(sample) for sample in expanded]
    encoded = dict(processor.tokenizer(expanded, **tokenizer_kwargs))
    if videos_in is not None:
        encoded["pixel_values_videos"] = videos_in["pixel_values_videos"]
    if has_images:
        flat = [image for group in images for image in group]
        size = processor.image_processor.size
        pixels = processor.image_processor(
            flat, image_grid_pinpoints=[[size["height"], size["width"]]], return_tensors="pt"
        )
        encoded["pixel_values"] = pixels["pixel_values"][:, :1]
        encoded["image_sizes"] = pixels["image_sizes"]
        encoded["batch_num_images"] = pixels.get("batch_num_images")
    return BatchFeature(encoded)
