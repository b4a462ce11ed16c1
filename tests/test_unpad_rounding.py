"""HF rounds the unpadded grid where the authors' LLaVA-NeXT code truncates: pinned for one image size at
LLaVA-OneVision-0.5B's settings (384 px crops, 27x27 patches, AnyRes pinpoints 1x1..6x6, anyres_max_9)."""

from __future__ import annotations

import math

import torch
from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

from llava_integration.tiny import build_tokenizer

CROP, PATCHES, MAX_CROPS = 384, 27, 9
PINPOINTS = [[CROP * rows, CROP * cols] for rows in range(1, 7) for cols in range(1, 7)]
HEIGHT, WIDTH = 375, 1375  # "1375x375": 1375 wide, 375 high


def authors_token_count(height: int, width: int) -> int:
    """Visual tokens of one image in the authors' LLaVA-NeXT code: `unpad_image` truncates with `int(x)`."""
    best_height, best_width = select_best_resolution([height, width], PINPOINTS)
    rows, cols = PATCHES * best_height // CROP, PATCHES * best_width // CROP
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(height * (cols / width))) // 2)
    else:
        cols -= 2 * ((cols - int(width * (rows / height))) // 2)
    times = math.sqrt(rows * cols / (MAX_CROPS * PATCHES**2))
    if times > 1.1:
        rows, cols = int(rows // times), int(cols // times)
    return PATCHES**2 + rows * (cols + 1)  # base view, then each grid row and its newline token


def test_hf_keeps_two_more_grid_columns_than_the_authors_code_for_1375x375():
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS
        ),
        video_processor=LlavaOnevisionVideoProcessor(),
        tokenizer=build_tokenizer(),
        num_image_tokens=PATCHES**2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{MAX_CROPS}",
    )
    assert processor._get_number_of_features(HEIGHT, WIDTH, CROP, CROP) == 3456
    assert authors_token_count(HEIGHT, WIDTH) == 3402
    # The model packs what the processor counts: a 1x4 grid (27x108 patches) unpadded to 100 columns, not 98.
    assert select_best_resolution([HEIGHT, WIDTH], PINPOINTS) == (CROP, 4 * CROP)
    assert unpad_image(torch.zeros(1, PATCHES, 4 * PATCHES), torch.tensor([HEIGHT, WIDTH])).shape == (1, 27, 100)
    assert WIDTH * (PATCHES / HEIGHT) < 99  # 98.999...: the authors' int() drops to 98, HF's round(x, 7) keeps 99
