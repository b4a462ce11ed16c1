"""The manager plugin: aggregates several layers of a uni-modal encoder into another stream. Knows no model."""

from .config import CONFIG_NAME, GRID_TYPES, MODALITIES, ManagerConfig
from .managers import MANAGER_TYPES, AdaptiveManager, Manager, QueryAttention, StaticManager, build_manager
from .ops import multiplicative_jitter, softmax_layer_weights, weighted_layer_sum
from .stack import LayerEmbedding, LayerManagers

__all__ = [
    "CONFIG_NAME",
    "GRID_TYPES",
    "MANAGER_TYPES",
    "MODALITIES",
    "AdaptiveManager",
    "LayerEmbedding",
    "LayerManagers",
    "Manager",
    "ManagerConfig",
    "QueryAttention",
    "StaticManager",
    "build_manager",
    "multiplicative_jitter",
    "softmax_layer_weights",
    "weighted_layer_sum",
]
