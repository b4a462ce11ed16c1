"""The manager inside HF transformers' LLaVA-OneVision, through hooks on the model's public seams."""

from .adapter import load_manager, save_manager
from .loading import LlavaOnevisionManagerForConditionalGeneration, load_model
from .patch import apply_manager, manager_of, remove_manager, set_image_aspect_ratio
from .processing import prepare_inputs
from .runtime import QUERY_MASK_KWARG

__all__ = [
    "QUERY_MASK_KWARG",
    "LlavaOnevisionManagerForConditionalGeneration",
    "apply_manager",
    "load_manager",
    "load_model",
    "manager_of",
    "prepare_inputs",
    "remove_manager",
    "save_manager",
    "set_image_aspect_ratio",
]
