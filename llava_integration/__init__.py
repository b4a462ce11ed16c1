"""The manager inside HF transformers' LLaVA-OneVision, through hooks on the model's public seams."""

from .adapter import load_manager, save_manager
from .conversion import ConversionError, convert_hf_to_llava_next, convert_llava_next_to_hf
from .loading import LlavaOnevisionManagerForConditionalGeneration, load_model
from .patch import apply_manager, manager_of, remove_manager, set_image_aspect_ratio
from .processing import prepare_inputs
from .query import instruction_query_mask, prompt_query
from .runtime import QUERY_MASK_KWARG

__all__ = [
    "QUERY_MASK_KWARG",
    "ConversionError",
    "LlavaOnevisionManagerForConditionalGeneration",
    "apply_manager",
    "convert_hf_to_llava_next",
    "convert_llava_next_to_hf",
    "instruction_query_mask",
    "load_manager",
    "load_model",
    "manager_of",
    "prepare_inputs",
    "prompt_query",
    "remove_manager",
    "save_manager",
    "set_image_aspect_ratio",
]
