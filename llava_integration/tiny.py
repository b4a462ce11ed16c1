"""The embedded tiny default: a small random LLaVA-OneVision in HF format, built offline in seconds, as a real one is.

`python -m llava_integration.tiny DIR --unimodal` writes the two unimodal checkpoints a reproduction starts from:
`DIR/siglip` (a SigLIP vision model with its pooling head and image processor) and `DIR/qwen2` (a Qwen2 causal LM and
its byte-level BPE tokenizer, trained on an embedded corpus). `python -m llava_integration.tiny DIR` writes them to a
scratch directory and assembles them (stage 0, `llava_integration.assemble`) into DIR: the LLaVA-OneVision model and
processor (the Qwen ChatML template, AnyRes grid pinpoints 1x1 .. 6x6) that `from_pretrained` loads.
"""

from __future__ import annotations

import argparse
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

from manager_plugin.bpe import train_byte_level_bpe

from .assemble import assemble, llava_onevision_config
from .chat_template import CHAT_TEMPLATE
from .conversion.to_hf import MEDIA_TOKENS
from .conversion.to_hf import build_processor as build_llava_processor

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


def qwen2_config(vocab_size: int) -> Qwen2Config:
    """The tiny Qwen2 (6 layers, width 64, tied embeddings)."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def build_config(vocab_size: int, image_token_id: int, video_token_id: int) -> LlavaOnevisionConfig:
    """The assembled tiny model's `LlavaOnevisionConfig`: SigLIP (6 blocks, width 32) + Qwen2 (6 layers, width 64)."""
    vision = siglip_config(TOWER_BLOCKS)
    vision.vision_use_head = False
    return llava_onevision_config(vision, qwen2_config(vocab_size), image_token_id, video_token_id, GRID_PINPOINTS)


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
    end_of_text, end_of_turn = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = qwen2_config(len(tokenizer))
    config.bos_token_id, config.eos_token_id = end_of_text, end_of_turn
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=end_of_text, eos_token_id=[end_of_turn, end_of_text], pad_token_id=end_of_text
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_unimodal(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """The tiny SigLIP and Qwen2 under `directory` (`siglip/`, `qwen2/`); returns their directories."""
    directory = Path(directory)
    return write_tiny_siglip(directory / "siglip", seed), write_tiny_qwen2(directory / "qwen2", seed)


def write_tiny(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny SigLIP and Qwen2 to a scratch directory and assemble them into `directory`; return it."""
    with tempfile.TemporaryDirectory(prefix="tiny-unimodal-") as scratch:
        vision, llm = write_tiny_unimodal(scratch, seed)
        path, _ = assemble(vision, llm, directory, grid=GRID, seed=seed)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write the tiny model (a new or empty directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--unimodal", action="store_true", help="write only the tiny SigLIP and Qwen2 (DIR/siglip, DIR/qwen2)"
    )
    args = parser.parse_args(argv)
    if args.unimodal:
        vision, llm = write_tiny_unimodal(args.directory, args.seed)
        print(f"wrote the tiny SigLIP to {vision} and the tiny Qwen2 to {llm}")
        return
    print(f"wrote the tiny LLaVA-OneVision to {write_tiny(args.directory, args.seed)}")


if __name__ == "__main__":
    main()
