"""Tokenizers for the tiny test and demo models, trained offline in milliseconds (no hub download)."""

from .bpe import train_byte_level_bpe

__all__ = ["train_byte_level_bpe"]
