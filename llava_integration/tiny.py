"""The embedded tiny default: a small random LLaVA-OneVision in HF format, built offline in seconds, as a real one is.

`llava-manager tiny DIR --unimodal` (or `python -m llava_integration.tiny ...`) writes the two unimodal checkpoints a reproduction starts from:
`DIR/siglip` (a SigLIP vision model with its pooling head and image processor) and `DIR/qwen2` (a Qwen2 causal LM and
its byte-level BPE tokenizer, trained on an embedded corpus). `llava-manager tiny DIR` writes them to a
scratch directory and assembles them (stage 0, `llava_integration.assemble`) into DIR: the LLaVA-OneVision model and
processor (the Qwen ChatML template, AnyRes grid pinpoints 1x1 .. 6x6) that `from_pretrained` loads.
`--family llava` / `llava_next` / `llava_next_video` writes a tiny LLaVA-1.5 / LLaVA-NeXT / LLaVA-NeXT-Video instead:
a CLIP tower (CLS token, `default` select strategy, the second-to-last layer), a Llama decoder, the same tokenizer
with a `USER: ... ASSISTANT:` chat template, and HF's processor of that family.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from tiny_tokenizers import train_byte_level_bpe

from .assemble import assemble, llava_onevision_config
from .chat_template import CHAT_TEMPLATE
from .conversion.to_hf import MEDIA_TOKENS
from .conversion.to_hf import build_processor as build_llava_processor
from .families import FAMILY_BY_NAME

IMAGE_SIZE = 32
PATCH_SIZE = 8
TOKENS_PER_CROP = (IMAGE_SIZE // PATCH_SIZE) ** 2
GRID = "1x1..6x6"
GRID_PINPOINTS = [[IMAGE_SIZE * rows, IMAGE_SIZE * cols] for rows in range(1, 7) for cols in range(1, 7)]
TOWER_BLOCKS = 6  # in the assembled model; the tiny SigLIP has one more, which stage 0 drops
LLM_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIAL_TOKENS = [*LLM_TOKENS, *MEDIA_TOKENS]
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


def build_tokenizer(media_tokens: bool = True) -> PreTrainedTokenizerBase:
    """A Qwen2 byte-level BPE tokenizer trained on `CORPUS_WORDS` with Qwen's special tokens and, as the assembled
    model's, `<image>` and `<video>` (`media_tokens=False`: the tiny Qwen2's own)."""
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
        model_max_length=4096,
    )
    added = SPECIAL_TOKENS if media_tokens else LLM_TOKENS
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in added], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def siglip_config(blocks: int = TOWER_BLOCKS + 1) -> SiglipVisionConfig:
    """The tiny SigLIP vision model (width 32, 8 px patches of 32 px images); with its pooling head by default."""
    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=blocks,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )


def qwen2_config(vocab_size: int, eos_token_id: int | None = None, pad_token_id: int | None = None) -> Qwen2Config:
    """The tiny Qwen2 (6 layers, width 64, tied embeddings); with the tokenizer's end and padding ids, generation
    stops at the end of a turn."""
    return Qwen2Config(
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


def build_config(
    vocab_size: int,
    image_token_id: int,
    video_token_id: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> LlavaOnevisionConfig:
    """The assembled tiny model's `LlavaOnevisionConfig`: SigLIP (6 blocks, width 32) + Qwen2 (6 layers, width 64)."""
    vision = siglip_config(TOWER_BLOCKS)
    vision.vision_use_head = False
    text = qwen2_config(vocab_size, eos_token_id, pad_token_id)
    return llava_onevision_config(vision, text, image_token_id, video_token_id, GRID_PINPOINTS)


def build_processor(tokenizer: PreTrainedTokenizerBase) -> LlavaOnevisionProcessor:
    """The assembled tiny model's processor (32 px crops, 16 tokens each, AnyRes 1x1 .. 6x6)."""
    return build_llava_processor(tokenizer, siglip_config(), GRID_PINPOINTS, "anyres_max_9")


def write_tiny_siglip(directory: str | Path, seed: int = 0) -> Path:
    """A random tiny SigLIP vision model and its image processor, as a SigLIP checkpoint directory holds them."""
    directory = Path(directory)
    torch.manual_seed(seed)
    SiglipVisionModel(siglip_config()).save_pretrained(directory)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    return directory


def write_tiny_qwen2(directory: str | Path, seed: int = 0) -> Path:
    """A random tiny Qwen2 causal LM with its tokenizer and generation config (ChatML stop tokens, as Qwen2-Instruct)."""
    directory = Path(directory)
    tokenizer = build_tokenizer(media_tokens=False)
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id  # <|im_end|>, <|endoftext|>
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(len(tokenizer), end, pad))
    model.generation_config = GenerationConfig(eos_token_id=end, pad_token_id=pad)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_unimodal(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """The tiny SigLIP and Qwen2 under `directory` (`siglip/`, `qwen2/`); returns their directories."""
    directory = Path(directory)
    return write_tiny_siglip(directory / "siglip", seed), write_tiny_qwen2(directory / "qwen2", seed)


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


ONEVISION = "llava_onevision"
CLIP_LLAMA_FAMILIES = tuple(name for name in FAMILY_BY_NAME if name != ONEVISION)  # the others: CLIP + Llama


def clip_llama_processor(family: str, tokenizer: PreTrainedTokenizerBase, crop: int, patch: int, pinpoints: list):
    """HF's processor of a CLIP + Llama `family` ("llava", "llava_next", "llava_next_video"): `crop` px crops of
    `patch` px patches read with the CLS token dropped (`default`), AnyRes `pinpoints` (NeXT), the Vicuna template."""
    from transformers import (
        CLIPImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
        LlavaProcessor,
    )

    if family not in CLIP_LLAMA_FAMILIES:
        raise ValueError(f"unknown CLIP + Llama family {family!r}: expected one of {', '.join(CLIP_LLAMA_FAMILIES)}")
    tokenizer.chat_template = VICUNA_TEMPLATE
    sizes = {"size": {"shortest_edge": crop}, "crop_size": {"height": crop, "width": crop}}
    normalise = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    reading = {"patch_size": patch, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    if family == "llava":
        return LlavaProcessor(
            CLIPImageProcessor(**sizes, **normalise), tokenizer, chat_template=VICUNA_TEMPLATE, **reading
        )
    images = LlavaNextImageProcessor(**sizes, **normalise, image_grid_pinpoints=pinpoints)
    if family == "llava_next":
        return LlavaNextProcessor(images, tokenizer, chat_template=VICUNA_TEMPLATE, **reading)
    videos = LlavaNextVideoVideoProcessor(**sizes, **normalise)
    return LlavaNextVideoProcessor(videos, images, tokenizer, chat_template=VICUNA_TEMPLATE, **reading)


def clip_llama_config(family: str, vision, text, tokenizer: PreTrainedTokenizerBase, pinpoints: list):
    """The model config of a CLIP + Llama `family`, with the tokenizer's `<image>` (and `<video>`) ids."""
    from transformers import LlavaConfig, LlavaNextConfig, LlavaNextVideoConfig

    common = {
        "vision_config": vision,
        "text_config": text,
        "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
    }
    if family == "llava":
        return LlavaConfig(**common)
    if family == "llava_next":
        return LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
    if family == "llava_next_video":
        video = tokenizer.convert_tokens_to_ids("<video>")
        return LlavaNextVideoConfig(**common, image_grid_pinpoints=pinpoints, video_token_id=video)
    raise ValueError(f"unknown CLIP + Llama family {family!r}: expected one of {', '.join(CLIP_LLAMA_FAMILIES)}")


def build_clip_llama_model(family: str, seed: int = 0):
    """A tiny LLaVA-1.5 (`family` "llava"), LLaVA-NeXT ("llava_next") or LLaVA-NeXT-Video ("llava_next_video") and
    its processor, in memory."""
    from transformers import CLIPVisionConfig, LlamaConfig

    tokenizer = build_tokenizer()
    pinpoints = [[IMAGE_SIZE * rows, IMAGE_SIZE * cols] for rows in (1, 2) for cols in (1, 2)]  # up to 2x2 crops
    processor = clip_llama_processor(family, tokenizer, IMAGE_SIZE, PATCH_SIZE, pinpoints)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    config = clip_llama_config(family, vision, text, tokenizer, pinpoints)
    torch.manual_seed(seed)
    model = FAMILY_BY_NAME[config.model_type].model_class(config).eval()
    return _stops_at_end_of_turn(model, tokenizer), processor


def write_tiny(directory: str | Path, seed: int = 0, family: str = ONEVISION) -> Path:
    """Write the tiny model of `family` and its processor to `directory` in HF format; return the directory. The
    LLaVA-OneVision one is a tiny SigLIP and Qwen2, written to a scratch directory and assembled (stage 0)."""
    directory = Path(directory)
    if family == ONEVISION:
        with tempfile.TemporaryDirectory(prefix="tiny-unimodal-") as scratch:
            vision, llm = write_tiny_unimodal(scratch, seed)
            assemble(vision, llm, directory, grid=GRID, seed=seed)
        return directory
    model, processor = build_clip_llama_model(family, seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None, prog: str = "python -m llava_integration.tiny") -> None:
    """Write the tiny model (or only its unimodal parts) to the directory the command line names."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write the tiny model (a new or empty directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=list(FAMILY_BY_NAME), default=ONEVISION)
    parser.add_argument(
        "--unimodal",
        action="store_true",
        help="llava_onevision: write only the tiny SigLIP and Qwen2 (DIR/siglip, DIR/qwen2)",
    )
    args = parser.parse_args(argv)
    if args.unimodal:
        if args.family != ONEVISION:
            parser.error("--unimodal writes the LLaVA-OneVision family's SigLIP and Qwen2 only")
        vision, llm = write_tiny_unimodal(args.directory, args.seed)
        print(f"wrote the tiny SigLIP to {vision} and the tiny Qwen2 to {llm}")
        return
    print(f"wrote the tiny {args.family} model to {write_tiny(args.directory, args.seed, args.family)}")


if __name__ == "__main__":
    from llava_manager.cli import run_main

    sys.exit(run_main(main, prog="python -m llava_integration.tiny"))
