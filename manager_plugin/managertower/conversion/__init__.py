"""Conversion of the authors' ManagerTower / BridgeTower Lightning checkpoints to HF format.

`original.py` reads the checkpoint and its config, `rules.py` maps every target tensor to the original ones,
`target.py` builds the target config, `lightning.py` runs the conversion.
"""

from ...io import ConversionError
from .lightning import FORMATS, HEADS, ConversionResult, convert_lightning_checkpoint
from .original import OriginalConfig, load_lightning_checkpoint
from .target import bridgetower_config, managertower_config

__all__ = [
    "FORMATS",
    "HEADS",
    "ConversionError",
    "ConversionResult",
    "OriginalConfig",
    "bridgetower_config",
    "convert_lightning_checkpoint",
    "load_lightning_checkpoint",
    "managertower_config",
]
