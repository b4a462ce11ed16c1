"""The model sizes the benchmark runs: the embedded tiny model, a CPU-sized `small`, and LLaVA-OV-0.5B's shape.

Each size is data: the SigLIP and Qwen2 shapes, the crop size, and the default workload (image size, text length).
Weights are random; only shapes matter for cost. `small` is 0.5B with every width divided by 4 (layer counts,
head dims and the vision/LLM/projector proportions kept, vocabulary scaled with the width) and 224 px crops, so the
paper's 13 managed vision layers and 6 injection layers apply unchanged; `small384` is `small` with the real 384 px crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from llava_integration import tiny


@dataclass(frozen=True)
class BenchSize:
    """One benchmark size: model shapes and its default workload."""

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int  # unused by the embedded tiny model, whose vocabulary is its tokenizer's
    default_image: tuple[int, int]  # (height, width) of each benchmark image
    default_text_tokens: int
    default_batch_size: int = 1
    embedded_tiny: bool = False  # build exactly `llava_integration.tiny`'s config and processor

    @property
    def tokens_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SIZES: dict[str, BenchSize] = {
    # The embedded tiny model of `llava_integration.tiny` (its own tokenizer vocabulary).
    "tiny": BenchSize(
        32, 64, 6, 2, tiny.IMAGE_SIZE, tiny.PATCH_SIZE, 64, 128, 6, 4, 2, 0, (64, 64), 32, embedded_tiny=True
    ),
    # 0.5B / 4 in width: SigLIP 288 (4 heads of 72), Qwen2 224 (4 heads of 56, 2 KV heads), 256 tokens per crop.
    "small": BenchSize(288, 1076, 26, 4, 224, 14, 224, 1216, 24, 4, 2, 37984, (448, 448), 64),
    # `small` at the real geometry: 384 px crops of 14 px patches, 729 tokens per crop (a 2x2 grid: 3,645).
    "small384": BenchSize(288, 1076, 26, 4, 384, 14, 224, 1216, 24, 4, 2, 37984, (768, 768), 64),
    # LLaVA-OneVision-0.5B: SigLIP so400m-patch14-384 without its last block + Qwen2-0.5B.
    "0.5b": BenchSize(1152, 4304, 26, 16, 384, 14, 896, 4864, 24, 14, 2, 151936, (768, 768), 64),
}


def grid_pinpoints(size: BenchSize) -> list[list[int]]:
    """LLaVA-OneVision's AnyRes candidates: (1x1) .. (6x6) crops of the tower's input size."""
    return [[size.image_size * rows, size.image_size * cols] for rows in range(1, 7) for cols in range(1, 7)]


def build_processor(size: BenchSize) -> LlavaOnevisionProcessor:
    """An HF processor for `size`: the tiny model's tokenizer and chat template, the size's crops and grids."""
    if size.embedded_tiny:
        return tiny.build_processor(tiny.build_tokenizer())
    crop = {"height": size.image_size, "width": size.image_size}
    normalise = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=crop, image_grid_pinpoints=grid_pinpoints(size), **normalise),
        tokenizer=tiny.build_tokenizer(),
        video_processor=LlavaOnevisionVideoProcessor(size=crop, **normalise),
        num_image_tokens=size.tokens_per_crop,
        vision_feature_select_strategy="full",
        chat_template=tiny.CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


def build_config(size: BenchSize, processor: LlavaOnevisionProcessor) -> LlavaOnevisionConfig:
    """The `LlavaOnevisionConfig` of `size`, with the processor's image and video token ids."""
    tokenizer = processor.tokenizer
    image_token, video_token = (tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>"))
    if size.embedded_tiny:
        return tiny.build_config(len(tokenizer), image_token, video_token)
    if size.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {size.vocab_size} is smaller than the benchmark tokenizer's {len(tokenizer)}")
    vision = SiglipVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=size.vocab_size,
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    return tiny.llava_onevision_config(vision, text, image_token, video_token, grid_pinpoints(size))


def build_model(
    config: LlavaOnevisionConfig, device: str | torch.device, dtype: torch.dtype, attention: str, seed: int = 0
) -> LlavaOnevisionForConditionalGeneration:
    """A randomly initialised model on `device` (`meta` allocates nothing: for parameter and FLOP counts)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attention)
    return model
