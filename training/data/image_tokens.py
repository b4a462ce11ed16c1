"""How many visual tokens each image of a sample becomes, exactly as the HF processor expands them."""

from __future__ import annotations

from collections.abc import Sequence

from llava_integration.processing import image_tokens_per_square_image, use_image_mode


def image_token_counts(processor, image_sizes: Sequence[tuple[int, int]], image_aspect_ratio: str | None) -> list[int]:
    """Tokens per image of ONE sample, from the images' `(height, width)`.

    Square: the base view only. AnyRes: a single image gets its grid (HF's formula, capped by `anyres_max_<N>`); each
    image of a multi-image sample gets its base view plus one newline token, as HF does. None (LLaVA-1.5, NeXT):
    the processor's own count.
    """
    if image_aspect_ratio is None:
        if not image_sizes:
            return []
        return list(
            processor._get_num_multimodal_tokens(image_sizes=[list(size) for size in image_sizes]).num_image_tokens
        )
    if image_aspect_ratio == "square":
        return [image_tokens_per_square_image(processor)] * len(image_sizes)
    drop_cls = 1 if processor.vision_feature_select_strategy == "default" else 0
    if len(image_sizes) > 1:
        return [processor.num_image_tokens + 1 - drop_cls] * len(image_sizes)
    use_image_mode(processor, image_aspect_ratio)  # read by HF's formula, as prepare_inputs sets it
    size = processor.image_processor.size
    return [
        processor._get_number_of_features(height, width, size["height"], size["width"]) - drop_cls
        for height, width in image_sizes
    ]
