"""The model sizes the benchmark runs: the embedded tiny model, a CPU-sized `small`, and LLaVA-OV-0.5B's shape.

Each size is data: the vision tower and LLM shapes, the crop size, and the default workload (image size, text length).
The family says what is built at that size: LLaVA-OneVision a SigLIP + Qwen2, the others (LLaVA-1.5, NeXT,
NeXT-Video) a CLIP (CLS token, `default` select strategy) + Llama with their own HF processor and NeXT's AnyRes grids.
Weights are random; only shapes matter for cost. `small` is 0.5B with every width divided by 4 (layer counts,
head dims and the vision/LLM/projector proportions kept, vocabulary scaled with the width) and 224 px crops, so the
paper's 13 managed vision layers and 6 injection layers apply unchanged; `small384` is `small` with the real 384 px crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from llava_integration import tiny
from llava_integration.families import family_named
from llava_integration.tiny import ONEVISION


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
    vocab_size: int  # 0: the tokenizer's (the embedded tiny model's vocabulary)
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


def next_pinpoints(size: BenchSize) -> list[list[int]]:
    """LLaVA-NeXT's AnyRes candidates (its 336 px pinpoints: 1x2, 2x1, 2x2, 3x1, 1x3 crops) at the size's crops."""
    grids = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
    return [[size.image_size * rows, size.image_size * cols] for rows, cols in grids]


def build_processor(size: BenchSize, family: str = ONEVISION):
    """The HF processor of `family` for `size`: the tiny model's tokenizer, the family's chat template, the size's
    crops and grids."""
    if family != ONEVISION:
        tokenizer = tiny.build_tokenizer()
        return tiny.clip_llama_processor(family, tokenizer, size.image_size, size.patch_size, next_pinpoints(size))
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


def build_config(size: BenchSize, processor, family: str = ONEVISION):
    """The model config of `family` at `size`, with the processor's image and video token ids."""
    tokenizer = processor.tokenizer
    if family != ONEVISION:
        return _clip_llama_config(size, processor, family)
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


def _clip_llama_config(size: BenchSize, processor, family: str):
    """LLaVA-1.5 / NeXT / NeXT-Video at `size`: a CLIP tower and a Llama decoder of the size's shapes."""
    tokenizer = processor.tokenizer
    vocab_size = size.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the benchmark tokenizer's {len(tokenizer)}")
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=32768,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return tiny.clip_llama_config(family, vision, text, tokenizer, next_pinpoints(size))


def build_model(config, device: str | torch.device, dtype: torch.dtype, attention: str, seed: int = 0):
    """A randomly initialised model of `config`'s family on `device` (`meta` allocates nothing: for parameter and
    FLOP counts)."""
    torch.manual_seed(seed)
    model_class = family_named(config.model_type).model_class
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation=attention)
    return model
