"""The embedded tiny default: a small random LLaVA-OneVision in HF format, built offline in seconds.

`llava-manager tiny DIR` (or `python -m llava_integration.tiny DIR`) writes a directory that `LlavaOnevisionForConditionalGeneration` and
`AutoProcessor` load with `from_pretrained`: a SigLIP tower, a Qwen2 decoder, a byte-level BPE tokenizer trained on
an embedded corpus, the Qwen ChatML chat template, and an image processor with AnyRes grid pinpoints (1x1 .. 6x6).
`--family llava` / `llava_next` writes a tiny LLaVA-1.5 / LLaVA-NeXT instead: a CLIP tower (CLS token, `default`
select strategy, the second-to-last layer), a Llama decoder, the same tokenizer with a `USER: ... ASSISTANT:` chat
template, and HF's LLaVA / LLaVA-NeXT processor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tiny_tokenizers import train_byte_level_bpe

from .chat_template import CHAT_TEMPLATE

if TYPE_CHECKING:
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

IMAGE_SIZE = 32
PATCH_SIZE = 8
TOKENS_PER_CROP = (IMAGE_SIZE // PATCH_SIZE) ** 2
GRID_PINPOINTS = [[IMAGE_SIZE * rows, IMAGE_SIZE * cols] for rows in range(1, 7) for cols in range(1, 7)]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# Words the tiny tokenizer should hold whole: chat roles, and the vocabulary of the synthetic images and questions.
CORPUS_WORDS = """
system user assistant You are a helpful assistant. Answer with a single word. Answer with the option's letter.
What colour is the shape? What shape is in the image? Where is the shape? How many shapes are there?
Describe the image. The image shows a on the left right top bottom centre center middle of
red green blue yellow purple orange white black grey gray pink brown cyan
circle square triangle star cross ring diamond rectangle ellipse
one two three four five six seven eight nine ten zero
A B C D E yes no Yes No true false
small large big tiny and with in at is it there image picture photo shape shapes colour color text says word
Options: Question: Answer: Which letter The
"""


def build_tokenizer():
    """A Qwen2 byte-level BPE tokenizer trained on `CORPUS_WORDS`, with the LLaVA-OV special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    words = CORPUS_WORDS.split()
    # Each word both at the start of a text and after a space, so both forms become single tokens.
    lines = CORPUS_WORDS.strip().splitlines() + [" ".join(words)] * 4 + words
    vocab, merges = train_byte_level_bpe(lines, 640, [SPECIAL_TOKENS[0]], split_pattern=PRETOKENIZE_REGEX)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        model_max_length=4096,
    )
    tokenizer.add_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(
    vocab_size: int,
    image_token_id: int,
    video_token_id: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """The tiny `LlavaOnevisionConfig`: SigLIP (6 blocks, width 32) + Qwen2 (6 layers, width 64); with the
    tokenizer's end and padding ids, generation stops at the end of a turn."""
    from transformers import Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=None,  # the ChatML template starts no text with a BOS token
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return llava_onevision_config(vision, text, image_token_id, video_token_id, GRID_PINPOINTS)


def llava_onevision_config(
    vision: SiglipVisionConfig,
    text: Qwen2Config,
    image_token_id: int,
    video_token_id: int,
    image_grid_pinpoints: list[list[int]],
) -> LlavaOnevisionConfig:
    """A `LlavaOnevisionConfig` around a SigLIP and a Qwen2 config, read as LLaVA-OV-0.5B reads its tower: every
    patch token of the last hidden state (SigLIP has no CLS), AnyRes up to 9 crops, tied word embeddings."""
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=image_grid_pinpoints,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
    )


def build_processor(tokenizer):
    """The HF `LlavaOnevisionProcessor` for the tiny model (32 px crops, 16 tokens each)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    image_processor = LlavaOnevisionImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = LlavaOnevisionVideoProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=TOKENS_PER_CROP,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


def build_tiny_model(seed: int = 0):
    """The tiny model and its processor, in memory."""
    from transformers import LlavaOnevisionForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = build_config(
        len(tokenizer),
        tokenizer.convert_tokens_to_ids("<image>"),
        tokenizer.convert_tokens_to_ids("<video>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return _stops_at_end_of_turn(LlavaOnevisionForConditionalGeneration(config).eval(), tokenizer), processor


def _stops_at_end_of_turn(model, tokenizer):
    """`model` with the tokenizer's end and padding ids in its generation config, so `generate` stops at a turn's end."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# LLaVA-1.5's conversation (Vicuna v1): no system turn, `USER: ` and `ASSISTANT: ` turns, images first in a turn.
VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_clip_llama_model(family: str, seed: int = 0):
    """A tiny LLaVA-1.5 (`family` "llava") or LLaVA-NeXT ("llava_next") and its processor, in memory."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    if family not in ("llava", "llava_next"):
        raise ValueError(f"unknown tiny family {family!r}: expected 'llava' or 'llava_next'")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = VICUNA_TEMPLATE
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    common = {
        "vision_config": vision,
        "text_config": text,
        "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
    }
    sizes = {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}
    normalise = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    reading = {"patch_size": PATCH_SIZE, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    pinpoints = [[IMAGE_SIZE * rows, IMAGE_SIZE * cols] for rows in (1, 2) for cols in (1, 2)]  # up to 2x2 crops
    if family == "llava":
        config, model_class = LlavaConfig(**common), LlavaForConditionalGeneration
        processor = LlavaProcessor(
            CLIPImageProcessor(**sizes, **normalise), tokenizer, chat_template=VICUNA_TEMPLATE, **reading
        )
    else:
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model_class = LlavaNextForConditionalGeneration
        processor = LlavaNextProcessor(
            LlavaNextImageProcessor(**sizes, **normalise, image_grid_pinpoints=pinpoints),
            tokenizer,
            chat_template=VICUNA_TEMPLATE,
            **reading,
        )
    torch.manual_seed(seed)
    return _stops_at_end_of_turn(model_class(config).eval(), tokenizer), processor


TINY_FAMILIES = ("llava_onevision", "llava", "llava_next")


def write_tiny(directory: str | Path, seed: int = 0, family: str = "llava_onevision") -> Path:
    """Write the tiny model of `family` and its processor to `directory` in HF format; return the directory."""
    directory = Path(directory)
    model, processor = build_tiny_model(seed) if family == "llava_onevision" else build_clip_llama_model(family, seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None, prog: str = "python -m llava_integration.tiny") -> None:
    """Write the tiny model to the directory the command line names."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write the tiny model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=TINY_FAMILIES, default="llava_onevision")
    args = parser.parse_args(argv)
    path = write_tiny(args.directory, args.seed, args.family)
    print(f"wrote the tiny {args.family} model to {path}")


if __name__ == "__main__":
    from llava_manager.cli import run_main

    sys.exit(run_main(main, prog="python -m llava_integration.tiny"))
