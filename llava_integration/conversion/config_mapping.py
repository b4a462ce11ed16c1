"""LLaVA-NeXT's config.json fields <-> the HF `LlavaOnevisionConfig` and our `ManagerConfig`, field by field.

LLaVA-NeXT reads these fields with `getattr(config, name, default)` at use sites; here each one is read once, checked,
and translated, so a field the HF model cannot reproduce is an error rather than a silent default.
"""

from __future__ import annotations

import ast
import re
from itertools import pairwise
from typing import Any

from transformers import Qwen2Config

from manager_plugin import GRID_TYPES, MANAGER_TYPES, ManagerConfig
from manager_plugin.io import ConversionError

from ..image_modes import SQUARE, anyres_max_crops

# model_type -> whether that class can run a manager (llava_qwen uses HF's plain Qwen2 decoder).
MODEL_TYPES = {"llava_qwen": False, "llava_qwen_manager": True}
ARCHITECTURES = {"llava_qwen": "LlavaQwenForCausalLM", "llava_qwen_manager": "LlavaQwenManagerForCausalLM"}
PROJECTOR_TYPE = "mlp2x_gelu"
MANAGER_SUFFIX = "_zerouni"  # the only manager classes the released code defines (zero-initialised, residual)
ORIGINAL_JITTER = 0.01  # LLaVA-NeXT's noise_jitter epsilon, fixed in code
TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_theta",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
)
REQUIRED_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_GRID_RANGE = re.compile(r"\((\d+)x(\d+)\)")


def has_manager(original: dict[str, Any]) -> bool:
    """Whether the checkpoint of this config holds a manager; unknown model types are an error."""
    model_type = original.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"unknown model type {model_type!r}: expected one of {sorted(MODEL_TYPES)}")
    managed = original.get("mm_manager_type") is not None
    if managed and not MODEL_TYPES[model_type]:
        raise ConversionError(
            f"model type {model_type!r} runs no manager, yet config.json sets mm_manager_type "
            f"{original['mm_manager_type']!r}: expected model type 'llava_qwen_manager'"
        )
    return managed


def check_projector(original: dict[str, Any]) -> None:
    projector = original.get("mm_projector_type", "linear")
    if projector != PROJECTOR_TYPE:
        raise ConversionError(
            f"mm_projector_type {projector!r} is not supported: HF LLaVA-OneVision's projector is {PROJECTOR_TYPE!r}"
        )


# -- the language model ---------------------------------------------------------------------------------------------
def text_config_from_original(original: dict[str, Any]) -> Qwen2Config:
    """The Qwen2 config of the language model (LLaVA-NeXT's Qwen classes always drop rope_scaling)."""
    missing = [name for name in REQUIRED_TEXT_FIELDS if name not in original]
    if missing:
        raise ConversionError(f"config.json lacks the language model fields {missing}")
    return Qwen2Config(**{name: original[name] for name in TEXT_FIELDS if name in original})


def original_text_fields(text_config: Qwen2Config) -> dict[str, Any]:
    """The Qwen2 fields of a LLaVA-NeXT config.json."""
    data = text_config.to_dict()
    if data.get("model_type") != "qwen2":
        raise ConversionError(f"LLaVA-NeXT's Qwen classes need a qwen2 language model, got {data.get('model_type')!r}")
    rope = data.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_parameters {rope} cannot be written: LLaVA-NeXT's Qwen classes drop rope scaling")
    fields = {name: data[name] for name in TEXT_FIELDS if name in data}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    return fields


# -- images: square or AnyRes grids -------------------------------------------------------------------------------
def _pinpoints_width_height(value: Any, image_size: int) -> list[tuple[int, int]]:
    """LLaVA-NeXT's `image_grid_pinpoints` as (width, height) pixel pairs: a list, a list literal, or "(1x1),...,(6x6)"."""
    if isinstance(value, str):
        grids = _GRID_RANGE.findall(value)
        if grids:
            (first_w, first_h), (last_w, last_h) = [tuple(map(int, grid)) for grid in (grids[0], grids[-1])]
            return [
                (w * image_size, h * image_size) for w in range(first_w, last_w + 1) for h in range(first_h, last_h + 1)
            ]
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as error:
            raise ConversionError(f"image_grid_pinpoints {value!r} is neither '(AxB),...,(CxD)' nor a list") from error
    if not isinstance(value, (list, tuple)) or not value:
        raise ConversionError(f"image_grid_pinpoints must be a non-empty list of [width, height], got {value!r}")
    pairs = []
    for pair in value:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, int) and x > 0 for x in pair)):
            raise ConversionError(f"image_grid_pinpoints entry {pair!r} is not a [width, height] pair of pixels")
        pairs.append((pair[0], pair[1]))
    return pairs


def default_grid_pinpoints(image_size: int, max_grid: int = 6) -> list[list[int]]:
    """HF's (height, width) pinpoints (1x1) .. (6x6) crops, kept for square models so AnyRes can be switched on."""
    return [
        [rows * image_size, cols * image_size] for rows in range(1, max_grid + 1) for cols in range(1, max_grid + 1)
    ]


def image_mode_from_original(original: dict[str, Any], image_size: int) -> tuple[str, list[list[int]]]:
    """HF's `vision_aspect_ratio` and (height, width) `image_grid_pinpoints` for LLaVA-NeXT's image fields.

    Square images are one crop with no newline token whatever mm_patch_merge_type says. Plain `anyres` never
    downsamples the grid, which is `anyres_max_M` with M the most crops any pinpoint gives (HF has no plain anyres).
    """
    aspect = original.get("image_aspect_ratio", SQUARE)
    pinpoints = original.get("image_grid_pinpoints")
    if aspect == SQUARE:
        hf = [[h, w] for w, h in _pinpoints_width_height(pinpoints, image_size)] if pinpoints else None
        return SQUARE, hf or default_grid_pinpoints(image_size)
    if aspect != "anyres" and anyres_max_crops(aspect) is None:
        raise ConversionError(
            f"image_aspect_ratio {aspect!r} is not supported: expected 'square', 'anyres' or 'anyres_max_<N>'"
        )
    merge = original.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
        raise ConversionError(
            f"mm_patch_merge_type {merge!r} with image_aspect_ratio {aspect!r} is not supported: HF LLaVA-OneVision "
            "packs AnyRes grids as 'spatial_unpad' (unpad, newline per row, base view first)"
        )
    if pinpoints is None:
        raise ConversionError(f"image_aspect_ratio {aspect!r} needs image_grid_pinpoints, but config.json has none")
    pairs = _pinpoints_width_height(pinpoints, image_size)
    if aspect == "anyres":
        aspect = f"anyres_max_{max((w // image_size) * (h // image_size) for w, h in pairs)}"
    return aspect, [[h, w] for w, h in pairs]


def original_image_fields(vision_aspect_ratio: str, pinpoints: list[list[int]]) -> dict[str, Any]:
    """LLaVA-NeXT's image fields for an HF image mode (pinpoints back to (width, height))."""
    if vision_aspect_ratio == SQUARE:
        return {"image_aspect_ratio": SQUARE, "mm_patch_merge_type": "flat", "image_grid_pinpoints": None}
    if anyres_max_crops(vision_aspect_ratio) is None:
        raise ConversionError(f"vision_aspect_ratio {vision_aspect_ratio!r}: expected 'square' or 'anyres_max_<N>'")
    return {
        "image_aspect_ratio": vision_aspect_ratio,
        "mm_patch_merge_type": "spatial_unpad",
        "image_grid_pinpoints": [[w, h] for h, w in pinpoints],
    }


# -- the manager ----------------------------------------------------------------------------------------------------
def _int_field(original: dict[str, Any], name: str, minimum: int) -> int:
    value = original.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConversionError(
            f"{name} is {value!r}: expected an int >= {minimum} (LLaVA-NeXT's build_manager asserts it)"
        )
    return value


def _range_fields(original: dict[str, Any], prefix: str) -> tuple[int, int, int]:
    return (
        _int_field(original, f"{prefix}_start", 0),
        _int_field(original, f"{prefix}_interval", 1),
        _int_field(original, f"{prefix}_end", 1),
    )


def manager_config_from_original(original: dict[str, Any], num_decoder_layers: int, square: bool) -> ManagerConfig:
    """Our `ManagerConfig` for LLaVA-NeXT's `mm_manager_*` fields (vision layers index the truncated tower's states)."""
    kind = original.get("mm_manager_type")
    base = kind[: -len(MANAGER_SUFFIX)] if isinstance(kind, str) and kind.endswith(MANAGER_SUFFIX) else None
    if base not in MANAGER_TYPES:
        raise ConversionError(
            f"unknown mm_manager_type {kind!r}: expected one of {sorted(name + MANAGER_SUFFIX for name in MANAGER_TYPES)}"
        )
    if original.get("mm_manager_residual") is not True:
        raise ConversionError(
            f"mm_manager_residual is {original.get('mm_manager_residual')!r}: the zero-initialised managers are "
            "residual only (expected true)"
        )
    grid_type = original.get("mm_manager_grid_type")
    if grid_type is None and square:
        grid_type = "all"  # square images have no grid, so LLaVA-NeXT never reads the field
    if grid_type not in GRID_TYPES:
        raise ConversionError(f"mm_manager_grid_type {grid_type!r}: expected one of {list(GRID_TYPES)}")
    start, interval, end = _range_fields(original, "mm_manager_vision_select_layers")
    vision_layers = list(range(start, end, interval))
    start, interval, end = _range_fields(original, "mm_manager_injection")
    injection_layers = list(range(start, min(num_decoder_layers, end), interval))
    for name, layers in (("vision select layers", vision_layers), ("injection layers", injection_layers)):
        if not layers:
            raise ConversionError(f"the mm_manager_* fields select no {name}")
    try:
        return ManagerConfig(
            vision_layers=vision_layers,
            injection_layers=injection_layers,
            manager_type=base,
            grid_type=grid_type,
            jitter=ORIGINAL_JITTER,
        )
    except (TypeError, ValueError) as error:
        raise ConversionError(f"the mm_manager_* fields give an invalid manager: {error}") from error


def _as_range(name: str, layers: list[int]) -> dict[str, int]:
    step = layers[1] - layers[0] if len(layers) > 1 else 1
    if any(b - a != step for a, b in pairwise(layers)):
        raise ConversionError(
            f"{name} {layers} is not evenly spaced: LLaVA-NeXT's {name}_{{start,interval,end}} can only express "
            "range(start, end, interval)"
        )
    return {f"{name}_start": layers[0], f"{name}_interval": step, f"{name}_end": layers[-1] + step}


def original_manager_fields(config: ManagerConfig) -> dict[str, Any]:
    """LLaVA-NeXT's `mm_manager_*` fields for a resolved `ManagerConfig`."""
    return {
        "mm_manager_type": config.manager_type + MANAGER_SUFFIX,
        "mm_manager_grid_type": config.grid_type,
        **_as_range("mm_manager_vision_select_layers", config.vision_layers),
        **_as_range("mm_manager_injection", config.injection_layers),
        "mm_manager_residual": True,
    }
