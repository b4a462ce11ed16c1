"""Model inputs from text and images, for AnyRes grids (HF's processor) and for square images (base view only)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from transformers import BatchFeature

from .features import SQUARE


def image_tokens_per_square_image(processor) -> int:
    tokens = processor.num_image_tokens
    return tokens - 1 if processor.vision_feature_select_strategy == "default" else tokens


def prepare_inputs(
    processor,
    text: Sequence[str],
    images: Sequence[Sequence[Image.Image]] | None,
    image_aspect_ratio: str,
    **tokenizer_kwargs,
) -> BatchFeature:
    """Tokenised `text` (one `<image>` per image) with pixel values, as the model expects in `image_aspect_ratio`.

    `images` holds one list per text (empty for text-only samples). With "square" each image is resized to the
    tower's input size and becomes its base view's tokens, with no grid and no newline token.
    """
    tokenizer_kwargs.setdefault("padding", True)
    tokenizer_kwargs.setdefault("return_tensors", "pt")
    has_images = images is not None and any(len(group) for group in images)
    if image_aspect_ratio != SQUARE:
        if not has_images:
            return BatchFeature(dict(processor.tokenizer(list(text), **tokenizer_kwargs)))
        processor.vision_aspect_ratio = image_aspect_ratio
        return processor(text=list(text), images=[list(group) for group in images], **tokenizer_kwargs)

    image_token = processor.image_token
    expanded = [sample.replace(image_token, image_token * image_tokens_per_square_image(processor)) for sample in text]
    encoded = dict(processor.tokenizer(expanded, **tokenizer_kwargs))
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
