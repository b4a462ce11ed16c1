"""Checkpoint conversion between LLaVA-NeXT's format (the authors' released LLaVA-OV-Manager models) and HF's."""

from manager_plugin.io import ConversionError

from .to_hf import convert_llava_next_to_hf
from .to_llava_next import convert_hf_to_llava_next

__all__ = ["ConversionError", "convert_hf_to_llava_next", "convert_llava_next_to_hf"]
