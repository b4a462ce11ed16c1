"""Stage 0: an HF LLaVA-OneVision assembled from a SigLIP and a Qwen2 checkpoint, where the paper's stage 1 starts.

llava-manager assemble --vision VISION_DIR --llm LLM_DIR OUT        (or python -m llava_integration.assemble ...)
llava-manager assemble --vision ckpt/siglip-so400m-patch14-384 --llm ckpt/Qwen2-0.5B-Instruct \\
    --image-aspect-ratio anyres_max_9 --grid 1x1..6x6 ckpt/stage0      # LLaVA-OV-0.5B before stage 1

As LLaVA-OneVision builds its model: the SigLIP vision tower loses its last block and its pooling head (the model
reads the last remaining block: the full tower's second-to-last hidden state, every patch token); the Qwen2 causal LM
gets `<image>` and `<video>` tokens (embeddings grown by HF's mean resizing when they do not fit); the `mlp2x_gelu`
projector and `image_newline` are new, initialised as LLaVA-NeXT's `initialize_vision_modules` does. The processor
takes the SigLIP image processor's settings, the LLM's tokenizer and the Qwen ChatML template.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2ForCausalLM,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from manager_plugin.io import ConversionError, check_destination, staged_directory
from manager_plugin.provenance import environment_provenance

from .conversion.checkpoint_io import read_json
from .conversion.to_hf import MEDIA_TOKENS, build_processor, load_tokenizer
from .image_modes import is_image_mode

# config.json model_type -> what it holds; the vision tower is always read as a SiglipVisionModel.
VISION_MODEL_TYPES = {"siglip": "SiglipModel (text + vision)", "siglip_vision_model": "SiglipVisionModel"}
# config.json model_type -> the causal LM class LlavaOnevision's text config holds (one entry per family).
LANGUAGE_MODELS: dict[str, type[PreTrainedModel]] = {"qwen2": Qwen2ForCausalLM}
DEFAULT_ASPECT = "anyres_max_9"
DEFAULT_GRID = "1x1..6x6"  # LLaVA-OneVision's AnyRes candidates: 1 to 6 crops a side
PROVENANCE = "provenance.json"  # how the model was made, as every training stage's output records it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What the assembled processor takes from the SigLIP image processor (the crop size is the tower's input size).
IMAGE_SETTINGS = ("resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
logger = logging.getLogger(__name__)
_SHAPE = re.compile(r"([1-9]\d*)x([1-9]\d*)")


@dataclass(frozen=True)
class Assembly:
    """What stage 0 did, for the log: blocks kept, vocabulary sizes, the new parameters."""

    vision_blocks: int  # of the SigLIP checkpoint; the tower keeps all but the last
    tokens_before: int  # the LLM's embedding rows
    tokens_after: int
    new_parameters: int  # projector + image_newline (+ grown embedding rows)


def parse_grid(spec: str) -> list[tuple[int, int]]:
    """AnyRes grid shapes as (rows, cols) crops: "1x1..6x6" (every shape in the range) or "1x2,2x1,2x2"."""
    first, dots, last = spec.partition("..")
    if dots:
        bounds = [_SHAPE.fullmatch(part.strip()) for part in (first, last)]
        if not all(bounds):
            raise ConversionError(f"--grid {spec!r}: expected ROWSxCOLS..ROWSxCOLS (e.g. 1x1..6x6) or a list 1x2,2x1")
        (r0, c0), (r1, c1) = [tuple(int(x) for x in match.groups()) for match in bounds]
        shapes = [(rows, cols) for rows in range(r0, r1 + 1) for cols in range(c0, c1 + 1)]
    else:
        matches = [_SHAPE.fullmatch(part.strip()) for part in spec.split(",")]
        if not all(matches):
            raise ConversionError(f"--grid {spec!r}: expected ROWSxCOLS..ROWSxCOLS (e.g. 1x1..6x6) or a list 1x2,2x1")
        shapes = [tuple(int(x) for x in match.groups()) for match in matches]
    if not shapes:
        raise ConversionError(f"--grid {spec!r} gives no grid shape (is the range reversed?)")
    return shapes


def check_aspect(aspect: str) -> str:
    """`aspect` if HF LLaVA-OneVision (with our square mode) can run it, else a clear error."""
    if not is_image_mode(aspect):
        raise ConversionError(f"--image-aspect-ratio {aspect!r}: expected 'square' or 'anyres_max_<N>' (N >= 1)")
    return aspect


def llava_onevision_config(
    vision: SiglipVisionConfig,
    text: PretrainedConfig,
    image_token_id: int,
    video_token_id: int,
    image_grid_pinpoints: list[list[int]],
    vision_aspect_ratio: str = DEFAULT_ASPECT,
) -> LlavaOnevisionConfig:
    """A `LlavaOnevisionConfig` around a (truncated) SigLIP and a language model config, read as LLaVA-OV-0.5B reads
    its tower: every patch token of the last hidden state (SigLIP has no CLS), the LLM's own embedding tying."""
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=image_grid_pinpoints,
        vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=text.tie_word_embeddings,
    )


def _model_type(directory: Path, role: str, expected: dict[str, Any]) -> str:
    if not directory.is_dir():
        raise ConversionError(f"{role} {directory} is not a directory")
    model_type = read_json(directory / "config.json").get("model_type")
    if model_type not in expected:
        raise ConversionError(f"{role} {directory} holds model_type {model_type!r}: expected one of {sorted(expected)}")
    return model_type


def _checked_load(cls: type[PreTrainedModel], directory: Path, role: str) -> PreTrainedModel:
    """`cls.from_pretrained(directory)` in fp32, refusing a checkpoint that leaves any weight uninitialised."""
    try:
        model, info = cls.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot load the {role} in {directory}: {error}") from error
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise ConversionError(f"the {role} in {directory} lacks weights {missing[:5]}: a truncated checkpoint?")
    return model.eval()


def load_vision_tower(directory: Path) -> tuple[SiglipVisionModel, int]:
    """The SigLIP vision model without its last block and pooling head, and the checkpoint's block count."""
    tower = _checked_load(SiglipVisionModel, directory, "SigLIP vision model")
    blocks = len(tower.encoder.layers)
    if blocks < 2:
        raise ConversionError(f"the SigLIP in {directory} has {blocks} block(s): dropping the last leaves none")
    # LLaVA-OneVision reads the second-to-last hidden state; the last block would only cost time and memory.
    del tower.encoder.layers[-1]
    tower.config.num_hidden_layers = blocks - 1
    if tower.use_head:
        del tower.head
        tower.use_head = tower.config.vision_use_head = False
    return tower, blocks


def language_model_class(directory: Path) -> type[PreTrainedModel]:
    """The causal LM class of `directory`, if LlavaOnevision's text config can hold it."""
    cls = LANGUAGE_MODELS[_model_type(directory, "--llm", LANGUAGE_MODELS)]
    architectures = read_json(directory / "config.json").get("architectures") or [cls.__name__]
    if cls.__name__ not in architectures:
        raise ConversionError(
            f"--llm {directory} holds {architectures}: expected a {cls.__name__} (a causal LM with its LM head)"
        )
    return cls


def image_processor_settings(directory: Path, image_size: int) -> dict[str, Any]:
    """The SigLIP image processor's settings (HF's SigLIP defaults when the directory has none), checked against the
    tower's input size."""
    if (directory / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(directory)
    else:
        logger.warning("no preprocessor_config.json in %s: using HF's SigLIP image processor defaults", directory)
        processor = SiglipImageProcessor()
    size = getattr(processor, "size", None) or {}
    if "height" in size and (size["height"], size["width"]) != (image_size, image_size):
        raise ConversionError(
            f"the image processor in {directory} resizes to {size['height']}x{size['width']}, but the tower's input "
            f"is {image_size}x{image_size}"
        )
    return {name: getattr(processor, name) for name in IMAGE_SETTINGS}


def grow_vocabulary(language_model: PreTrainedModel, num_tokens: int, seed: int) -> None:
    """Give every token of the tokenizer an embedding row: HF's mean resizing, only when the rows are too few."""
    if num_tokens > language_model.get_input_embeddings().num_embeddings:
        with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random state left as it was
            torch.manual_seed(seed)
            language_model.resize_token_embeddings(num_tokens, mean_resizing=True)


def new_projector(vision_hidden: int, text_hidden: int, seed: int) -> tuple[nn.Sequential, torch.Tensor]:
    """A fresh `mlp2x_gelu` projector and `image_newline`, initialised as LLaVA-NeXT's `initialize_vision_modules`:
    PyTorch's default `nn.Linear` init, and the newline drawn from N(0, 1 / hidden_size)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = nn.Sequential(nn.Linear(vision_hidden, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden))
        newline = torch.randn(text_hidden) / torch.sqrt(torch.tensor(float(text_hidden)))
    return projector, newline


def assemble_model(
    vision: str | Path,
    llm: str | Path,
    *,
    image_aspect_ratio: str = DEFAULT_ASPECT,
    grid: str = DEFAULT_GRID,
    seed: int = 0,
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor, Assembly]:
    """The assembled model (fp32, eval mode) and processor, in memory; every input is checked first."""
    vision, llm = Path(vision), Path(llm)
    aspect, shapes = check_aspect(image_aspect_ratio), parse_grid(grid)
    _model_type(vision, "--vision", VISION_MODEL_TYPES)
    language_model_cls = language_model_class(llm)
    tokenizer = load_tokenizer(llm, hint="the --llm directory must hold the LLM's tokenizer")
    tower, blocks = load_vision_tower(vision)
    settings = image_processor_settings(vision, tower.config.image_size)
    language_model = _checked_load(language_model_cls, llm, language_model_cls.__name__)

    tokens_before = language_model.get_input_embeddings().num_embeddings
    grow_vocabulary(language_model, len(tokenizer), seed)
    text_config = language_model.config
    text_config.vocab_size = language_model.get_input_embeddings().num_embeddings
    image_size = tower.config.image_size
    pinpoints = [[rows * image_size, cols * image_size] for rows, cols in shapes]
    config = llava_onevision_config(
        tower.config,
        text_config,
        tokenizer.convert_tokens_to_ids(MEDIA_TOKENS[0]),
        tokenizer.convert_tokens_to_ids(MEDIA_TOKENS[1]),
        pinpoints,
        vision_aspect_ratio=aspect,
    )
    projector, newline = new_projector(tower.config.hidden_size, text_config.hidden_size, seed)

    with torch.device("meta"):  # every module is replaced below: allocate nothing twice
        model = LlavaOnevisionForConditionalGeneration(config)
    inner = model.model
    inner.vision_tower = tower
    inner.language_model = language_model.model
    model.lm_head = language_model.lm_head
    inner.multi_modal_projector.load_state_dict(
        {
            f"linear_{i}.{name}": projector[2 * (i - 1)].state_dict()[name]
            for i in (1, 2)
            for name in ("weight", "bias")
        },
        assign=True,
    )
    inner.image_newline = nn.Parameter(newline)
    if text_config.tie_word_embeddings and model.lm_head.weight is not inner.language_model.embed_tokens.weight:
        raise ConversionError("the LLM ties its word embeddings, but its LM head and embeddings are separate tensors")
    on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if on_meta:  # a module of the installed transformers that the lines above do not fill in
        raise ConversionError(f"assembly left tensors unset: {on_meta[:5]}")
    generation = _generation_config(llm)
    if generation is not None:
        model.generation_config = generation

    processor = build_processor(tokenizer, tower.config, pinpoints, aspect, image_settings=settings)
    grown = (
        (text_config.vocab_size - tokens_before) * text_config.hidden_size * (1 if config.tie_word_embeddings else 2)
    )
    new = sum(p.numel() for p in inner.multi_modal_projector.parameters()) + newline.numel() + grown
    return model.eval(), processor, Assembly(blocks, tokens_before, text_config.vocab_size, new)


def _generation_config(llm: Path) -> GenerationConfig | None:
    """The LLM's special token ids for generation; its sampling defaults stay behind (stage 1 starts the VLM)."""
    if not (llm / "generation_config.json").is_file():
        return None
    source = read_json(llm / "generation_config.json")
    return GenerationConfig(
        **{key: source[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in source}
    )


def assemble(
    vision: str | Path,
    llm: str | Path,
    out: str | Path,
    *,
    image_aspect_ratio: str = DEFAULT_ASPECT,
    grid: str = DEFAULT_GRID,
    seed: int = 0,
    dtype: str = "float32",
) -> tuple[Path, Assembly]:
    """Write the assembled model and processor to `out` (new or empty), which appears only when complete."""
    out = Path(out)
    check_destination(out)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    model, processor, assembly = assemble_model(
        vision, llm, image_aspect_ratio=image_aspect_ratio, grid=grid, seed=seed
    )
    model.to(DTYPES[dtype])
    inputs = {"vision": str(vision), "llm": str(llm), "image_aspect_ratio": image_aspect_ratio, "grid": grid}
    provenance = {**environment_provenance(), "stage0": {**inputs, "seed": seed, "dtype": dtype, **asdict(assembly)}}
    with staged_directory(out) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / PROVENANCE).write_text(json.dumps(provenance, indent=1))
    return out, assembly


def build_parser(prog: str = "python -m llava_integration.assemble") -> argparse.ArgumentParser:
    """The command line of stage 0."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="a new (or empty) directory for the LLaVA-OneVision model")
    parser.add_argument("--vision", type=Path, required=True, help="a SigLIP directory (SiglipModel or vision model)")
    parser.add_argument("--llm", type=Path, required=True, help="a Qwen2 causal LM directory, with its tokenizer")
    parser.add_argument(
        "--image-aspect-ratio",
        default=DEFAULT_ASPECT,
        help=f"'square' (base view only) or 'anyres_max_<N>' (default {DEFAULT_ASPECT}; each recipe sets its own)",
    )
    parser.add_argument(
        "--grid",
        default=DEFAULT_GRID,
        help="AnyRes grids as ROWSxCOLS crops of the tower's input size: a range 1x1..6x6 or a list 1x2,2x1,2x2 "
        f"(default {DEFAULT_GRID})",
    )
    parser.add_argument("--seed", type=int, default=0, help="for the new projector, newline and embedding rows")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="of the saved weights")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m llava_integration.assemble") -> int:
    """Parse the options, assemble, say what was built; bad input is a `ConversionError` naming the problem."""
    args = build_parser(prog).parse_args(argv)
    out, assembly = assemble(
        args.vision,
        args.llm,
        args.out,
        image_aspect_ratio=args.image_aspect_ratio,
        grid=args.grid,
        seed=args.seed,
        dtype=args.dtype,
    )
    print(
        f"wrote {out}: SigLIP {assembly.vision_blocks} -> {assembly.vision_blocks - 1} blocks, vocabulary "
        f"{assembly.tokens_before} -> {assembly.tokens_after} rows, {assembly.new_parameters:,} new parameters"
    )
    return 0


if __name__ == "__main__":
    from llava_manager.cli import run_main

    sys.exit(run_main(main, prog="python -m llava_integration.assemble"))
