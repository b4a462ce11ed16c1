"""The manager inside HF transformers' LLaVA family (LLaVA-1.5, NeXT, NeXT-Video, OneVision), through hooks on the
models' public seams."""

from .adapter import load_manager, save_manager
from .conversion import ConversionError, convert_hf_to_llava_next, convert_llava_next_to_hf
from .families import FAMILIES, ModelFamily, family_of
from .loading import (
    MANAGER_CLASSES,
    LlavaManagerForConditionalGeneration,
    LlavaNextManagerForConditionalGeneration,
    LlavaNextVideoManagerForConditionalGeneration,
    LlavaOnevisionManagerForConditionalGeneration,
    load_model,
)
from .patch import apply_manager, manager_of, remove_manager, set_image_aspect_ratio
from .processing import image_mode_of, prepare_inputs
from .query import instruction_query_mask
from .runtime import QUERY_MASK_KWARG

__all__ = [
    "FAMILIES",
    "MANAGER_CLASSES",
    "QUERY_MASK_KWARG",
    "ConversionError",
    "LlavaManagerForConditionalGeneration",
    "LlavaNextManagerForConditionalGeneration",
    "LlavaNextVideoManagerForConditionalGeneration",
    "LlavaOnevisionManagerForConditionalGeneration",
    "ModelFamily",
    "apply_manager",
    "convert_hf_to_llava_next",
    "convert_llava_next_to_hf",
    "family_of",
    "image_mode_of",
    "instruction_query_mask",
    "load_manager",
    "load_model",
    "manager_of",
    "prepare_inputs",
    "remove_manager",
    "save_manager",
    "set_image_aspect_ratio",
]
