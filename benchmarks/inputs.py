"""Benchmark batches: one random image and a chat prompt per sample, through the real processor."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PretrainedConfig, ProcessorMixin

from llava_integration import prepare_inputs
from llava_integration.families import family_of
from llava_integration.features import packed_rows

from .flops import Workload, crop_tokens

# Words the benchmark tokenizer holds as single tokens; the question is these, repeated to the asked length.
_WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "left", "right", "top", "bottom"]


def _prompt(processor: ProcessorMixin, words: int) -> str:
    question = " ".join(_WORDS[i % len(_WORDS)] for i in range(words))
    content = [{"type": "image"}, {"type": "text", "text": f"Describe the image. {question}"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _text_tokens(processor: ProcessorMixin, prompt: str) -> int:
    ids = processor.tokenizer(prompt)["input_ids"]
    return sum(token != processor.tokenizer.convert_tokens_to_ids(processor.image_token) for token in ids)


def make_batch(
    processor: ProcessorMixin,
    aspect: str | None,
    batch_size: int,
    image_size: tuple[int, int],
    text_tokens: int,
    seed: int = 0,
) -> BatchFeature:
    """`batch_size` samples of one `image_size` (h, w) random image and a prompt of about `text_tokens` tokens."""
    base = _text_tokens(processor, _prompt(processor, 0))
    prompt = _prompt(processor, max(text_tokens - base, 0))
    rng = np.random.default_rng(seed)
    images = [[Image.fromarray((rng.random((*image_size, 3)) * 255).astype("uint8"))] for _ in range(batch_size)]
    return prepare_inputs(processor, [prompt] * batch_size, images, aspect)


def training_labels(batch: BatchFeature, config: PretrainedConfig) -> torch.Tensor:
    """Next-token labels on every text token (images and padding ignored), as a stage-2 step on all tokens."""
    labels = batch["input_ids"].clone()
    labels[batch["input_ids"] == config.image_token_id] = -100
    labels[batch["attention_mask"] == 0] = -100
    return labels


def workload(batch: BatchFeature, config: PretrainedConfig, aspect: str | None, model: torch.nn.Module) -> Workload:
    """The crops and tokens `batch` asks of `model` (of any LLaVA family, with `config`) in image mode `aspect`:
    the crops and packing the manager's runtime reads, from the family's own table entry."""
    input_ids = batch["input_ids"]
    family, inner = family_of(model)
    image_sizes = batch.get("image_sizes")
    num_images = batch["pixel_values"].shape[0]
    crops = family.crops(config, num_images, image_sizes, batch.get("batch_num_images"), aspect)
    tokens = crop_tokens(config)
    manager_tokens = sum(crops) * tokens
    pack = family.packing(inner, config.vision_feature_select_strategy, aspect)
    if pack is not None:
        rows, _ = packed_rows(image_sizes, crops, tokens, pack)
        manager_tokens = manager_tokens if rows is None else int((rows >= 0).sum())
    return Workload(
        batch_size=input_ids.shape[0],
        seq_len=input_ids.shape[1],
        crops=sum(crops),
        visual_tokens=int((input_ids == config.image_token_id).sum()),
        manager_tokens=manager_tokens,
    )
