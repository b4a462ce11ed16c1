"""HF LLaVA-OneVision + manager adapter (or a merged checkpoint) -> a LLaVA-NeXT `llava_qwen(_manager)` checkpoint."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from transformers import AutoTokenizer

from manager_plugin import CONFIG_NAME
from manager_plugin.io import ConversionError, check_destination, staged_directory

from ..features import SQUARE
from ..loading import load_model
from ..patch import manager_of
from .config_mapping import (
    ARCHITECTURES,
    ORIGINAL_JITTER,
    PROJECTOR_TYPE,
    original_image_fields,
    original_manager_fields,
    original_text_fields,
)
from .layout import ORIGINAL_LM_HEAD, ORIGINAL_NEWLINE, Layout, adapter_to_manager, rename_to_original
from .vision_tower import tower_name_for


def _check_expressible(config) -> None:
    """LLaVA-NeXT's SigLIP tower always feeds its last state, in full, through a GELU MLP projector."""
    checks = {
        "vision_feature_layer": (config.vision_feature_layer, -1),
        "vision_feature_select_strategy": (config.vision_feature_select_strategy, "full"),
        "projector_hidden_act": (config.projector_hidden_act, "gelu"),
        "vision_config.model_type": (config.vision_config.model_type, "siglip_vision_model"),
    }
    for name, (value, wanted) in checks.items():
        if value != wanted:
            raise ConversionError(f"{name} is {value!r}: a LLaVA-NeXT checkpoint can only express {wanted!r}")


def original_config(model, vision_tower: str) -> dict[str, Any]:
    """LLaVA-NeXT's config.json for an HF model and the manager applied to it."""
    config = model.config
    managers = manager_of(model)
    model_type = "llava_qwen_manager" if managers is not None else "llava_qwen"
    fields: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        **original_text_fields(config.text_config),
        "torch_dtype": str(model.dtype).removeprefix("torch."),
        "mm_vision_tower": vision_tower,
        "mm_projector_type": PROJECTOR_TYPE,
        "mm_hidden_size": config.vision_config.hidden_size,
        "mm_vision_select_layer": -2,  # of the full tower: the truncated tower's last state
        "mm_vision_select_feature": "patch",
        "use_mm_proj": True,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        **original_image_fields(config.vision_aspect_ratio, config.image_grid_pinpoints),
    }
    if managers is not None:
        if managers.config.jitter != ORIGINAL_JITTER:
            warnings.warn(
                f"manager jitter {managers.config.jitter} is training noise LLaVA-NeXT fixes at {ORIGINAL_JITTER}; "
                "inference is unaffected",
                stacklevel=2,
            )
        fields.update(original_manager_fields(managers.config))
    return fields


def convert_hf_to_llava_next(
    source: str | Path,
    destination: str | Path,
    *,
    manager: str | Path | None = None,
    vision_tower: str | None = None,
) -> Path:
    """Write the LLaVA-NeXT checkpoint of an HF model with its manager (a merged one, or the adapter in `manager`).

    Without `manager`, an adapter saved inside `source` (manager_config.json) is used when there is one.
    """
    source, destination = Path(source), Path(destination)
    check_destination(destination)
    if manager is None and (source / CONFIG_NAME).is_file():
        manager = source
    model = load_model(source, manager=manager, dtype="auto")
    _check_expressible(model.config)
    config = original_config(model, tower_name_for(model.config.vision_config, vision_tower))

    managers = manager_of(model)
    manager_prefix = next((name + "." for name, module in model.named_modules() if module is managers), None)
    base = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if manager_prefix is None or not name.startswith(manager_prefix)
    }
    tensors = rename_to_original(base, Layout.of(model))
    if config["tie_word_embeddings"]:
        del tensors[ORIGINAL_LM_HEAD]  # LLaVA-NeXT ties it to the embedding, as HF does
    if config["image_aspect_ratio"] == SQUARE:
        del tensors[ORIGINAL_NEWLINE]  # flat models have none
    if managers is not None:
        tensors.update(adapter_to_manager(managers.state_dict(), managers.config))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot load the tokenizer saved in {source}: {error}") from error

    with staged_directory(destination) as staging:
        contiguous = {key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}
        save_file(contiguous, staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
    return destination
