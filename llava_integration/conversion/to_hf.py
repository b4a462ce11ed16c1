"""LLaVA-NeXT checkpoint (`llava_qwen` / `llava_qwen_manager`) -> HF LLaVA-OneVision directory + manager adapter."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import (
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerBase,
    Qwen2Tokenizer,
    SiglipVisionConfig,
)
from transformers.image_utils import PILImageResampling

from manager_plugin import LayerManagers, ManagerConfig
from manager_plugin.io import ConversionError, check_destination, staged_directory

from ..adapter import load_manager_weights, save_manager
from ..chat_template import CHAT_TEMPLATE
from ..features import SQUARE
from ..patch import apply_manager, manager_of, resolve_manager_config
from .checkpoint_io import load_state_dict, read_json
from .config_mapping import (
    check_projector,
    has_manager,
    image_mode_from_original,
    manager_config_from_original,
    text_config_from_original,
)
from .layout import (
    ORIGINAL_EMBED,
    ORIGINAL_LM_HEAD,
    ORIGINAL_NEWLINE,
    Layout,
    count_vision_blocks,
    is_manager_tensor,
    manager_to_adapter,
    rename_to_hf,
)
from .vision_tower import full_tower_config, truncated_tower_config

MEDIA_TOKENS = ("<image>", "<video>")
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]  # LLaVA-NeXT's SigLipImageProcessor
BICUBIC = PILImageResampling.BICUBIC


def load_tokenizer(path: Path, hint: str = "pass one with --tokenizer DIR") -> PreTrainedTokenizerBase:
    """The Qwen2 tokenizer in `path`, with `<image>` and `<video>` added as special tokens; `hint` ends its errors."""
    # Qwen2Tokenizer builds an empty tokenizer from a directory without its files, so look for them first.
    if not any(all((path / name).is_file() for name in group) for group in TOKENIZER_FILES):
        raise ConversionError(f"no tokenizer in {path}: expected tokenizer.json or vocab.json + merges.txt; {hint}")
    try:  # by class: AutoTokenizer would consult config.json, whose llava_qwen* model type HF does not know
        tokenizer = Qwen2Tokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(f"cannot load the tokenizer in {path} ({error}): {hint}") from error
    vocabulary = tokenizer.get_vocab()
    absent = [token for token in CHAT_TOKENS if token not in vocabulary]
    if absent:
        raise ConversionError(f"the tokenizer in {path} lacks {absent}: the Qwen ChatML template needs them")
    absent = [token for token in MEDIA_TOKENS if token not in vocabulary]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in absent], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def fit_vocabulary(tensors: dict[str, torch.Tensor], num_tokens: int, tied: bool) -> dict[str, torch.Tensor]:
    """Grow the embedding (and an untied lm_head) by mean rows when the added media tokens do not fit in it."""
    if ORIGINAL_EMBED not in tensors:
        raise ConversionError(f"missing tensor in the checkpoint: ['{ORIGINAL_EMBED}']")
    rows = tensors[ORIGINAL_EMBED].shape[0]
    if num_tokens <= rows:
        return tensors
    grown = dict(tensors)
    for key in (ORIGINAL_EMBED,) if tied else (ORIGINAL_EMBED, ORIGINAL_LM_HEAD):
        if key in grown:
            weight = grown[key]
            extra = weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(num_tokens - rows, -1)
            grown[key] = torch.cat([weight, extra])
    return grown


def _base_tensors(
    tensors: dict[str, torch.Tensor], tied: bool, hidden_size: int, square: bool
) -> dict[str, torch.Tensor]:
    """The non-manager tensors, with the tied lm_head and a square model's unused newline filled in as HF needs."""
    base = {key: tensor for key, tensor in tensors.items() if not is_manager_tensor(key)}
    embed = base.get(ORIGINAL_EMBED)
    if tied and embed is not None:
        head = base.get(ORIGINAL_LM_HEAD)
        if head is not None and not torch.equal(head, embed):
            raise ConversionError(
                f"{ORIGINAL_LM_HEAD} differs from {ORIGINAL_EMBED} although tie_word_embeddings is true"
            )
        base[ORIGINAL_LM_HEAD] = embed
    if square and ORIGINAL_NEWLINE not in base and embed is not None:
        # Flat models have no newline token; HF's module always has one, which square images never use.
        base[ORIGINAL_NEWLINE] = torch.zeros(hidden_size, dtype=embed.dtype)
    return base


def build_processor(
    tokenizer: PreTrainedTokenizerBase,
    vision: SiglipVisionConfig,
    pinpoints: list[list[int]],
    aspect: str,
    image_settings: Mapping[str, Any] | None = None,
) -> LlavaOnevisionProcessor:
    """HF's processor with Qwen ChatML and SigLIP preprocessing: `image_settings` (resample, rescale, mean, std...) or
    LLaVA-NeXT's (bicubic resize, mean = std = 0.5)."""
    size = {"height": vision.image_size, "width": vision.image_size}
    settings = dict(image_settings or {"image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD, "resample": BICUBIC})
    image_processor = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints, **settings)
    normalise = {key: settings[key] for key in ("image_mean", "image_std") if key in settings}
    video_processor = LlavaOnevisionVideoProcessor(size=size, **normalise)
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        # HF's processor only counts AnyRes tokens; square models go through llava_integration.prepare_inputs.
        vision_aspect_ratio="anyres_max_9" if aspect == SQUARE else aspect,
    )


def convert_llava_next_to_hf(
    source: str | Path,
    destination: str | Path,
    *,
    vision_tower: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Convert a LLaVA-NeXT checkpoint directory; write the HF model, its processor and (if any) the manager adapter.

    Everything is read and checked before anything is written, and `destination` appears only when complete.
    """
    source, destination = Path(source), Path(destination)
    check_destination(destination)
    original = read_json(source / "config.json")
    managed = has_manager(original)
    check_projector(original)
    tensors = load_state_dict(source)

    text_config = text_config_from_original(original)
    tied = bool(text_config.tie_word_embeddings)
    vision_config = truncated_tower_config(
        full_tower_config(original.get("mm_vision_tower"), vision_tower), count_vision_blocks(tensors)
    )
    aspect, pinpoints = image_mode_from_original(original, vision_config.image_size)
    manager_config = (
        manager_config_from_original(original, text_config.num_hidden_layers, square=aspect == SQUARE)
        if managed
        else None
    )
    stray = sorted(key for key in tensors if is_manager_tensor(key))
    if stray and manager_config is None:
        raise ConversionError(
            f"unexpected manager tensors in a checkpoint whose config.json sets no mm_manager_type: {stray[:8]}"
        )

    tok = load_tokenizer(Path(tokenizer) if tokenizer is not None else source)
    tensors = fit_vocabulary(tensors, len(tok), tied)
    text_config.vocab_size = tensors[ORIGINAL_EMBED].shape[0]
    config = LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tok.convert_tokens_to_ids(MEDIA_TOKENS[0]),
        video_token_id=tok.convert_tokens_to_ids(MEDIA_TOKENS[1]),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,  # the truncated tower's last state: LLaVA-NeXT's mm_vision_select_layer -2
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=aspect,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    base = _base_tensors(tensors, tied, text_config.hidden_size, square=aspect == SQUARE)
    model.load_state_dict(rename_to_hf(base, Layout.of(model), expected), strict=True, assign=True)
    model.tie_weights()
    if (source / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)

    adapter, resolved = None, None
    if manager_config is not None:
        resolved = _resolve(config, manager_config)
        adapter = manager_to_adapter({key: t for key, t in tensors.items() if is_manager_tensor(key)}, resolved)
        with torch.device("meta"):
            load_manager_weights(LayerManagers(resolved), adapter, source=str(source))  # names and shapes, no copy

    processor = build_processor(tok, vision_config, pinpoints, aspect)
    with staged_directory(destination) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if adapter is not None:
            apply_manager(model, resolved)
            load_manager_weights(manager_of(model), adapter, source=str(source))
            save_manager(model, staging)
    return destination


def _resolve(config: LlavaOnevisionConfig, manager_config: ManagerConfig) -> ManagerConfig:
    try:
        return resolve_manager_config(config, manager_config)
    except ValueError as error:
        raise ConversionError(f"the mm_manager_* fields do not fit the model: {error}") from error
