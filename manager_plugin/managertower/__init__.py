"""ManagerTower (ACL 2023) as a Hugging Face model: RoBERTa + CLIP encoders, managers, cross-modal layers, heads."""

from .configuration_managertower import ManagerTowerConfig
from .heads import (
    TASK_HEADS,
    ManagerTowerForImageTextRetrieval,
    ManagerTowerForNLVR2,
    ManagerTowerForPreTraining,
    ManagerTowerForVisualEntailment,
    ManagerTowerForVisualQuestionAnswering,
    ManagerTowerHeadModel,
    ManagerTowerPreTrainingOutput,
    ManagerTowerTaskOutput,
)
from .managers import MANAGER_TOWER_TYPES, AdaptiveAggregation, BridgeLink, ExpertLayerNorm, StaticAggregation
from .modeling_managertower import (
    ManagerTowerModel,
    ManagerTowerModelOutput,
    ManagerTowerPreTrainedModel,
    UnimodalEncoding,
)
from .retrieval import encode_corpus, recall_at_k, rerank_scores

__all__ = [
    "MANAGER_TOWER_TYPES",
    "TASK_HEADS",
    "AdaptiveAggregation",
    "BridgeLink",
    "ExpertLayerNorm",
    "ManagerTowerConfig",
    "ManagerTowerForImageTextRetrieval",
    "ManagerTowerForNLVR2",
    "ManagerTowerForPreTraining",
    "ManagerTowerForVisualEntailment",
    "ManagerTowerForVisualQuestionAnswering",
    "ManagerTowerHeadModel",
    "ManagerTowerModel",
    "ManagerTowerModelOutput",
    "ManagerTowerPreTrainedModel",
    "ManagerTowerPreTrainingOutput",
    "ManagerTowerTaskOutput",
    "StaticAggregation",
    "UnimodalEncoding",
    "encode_corpus",
    "recall_at_k",
    "rerank_scores",
]


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(ManagerTowerConfig.model_type, ManagerTowerConfig, exist_ok=True)
    AutoModel.register(ManagerTowerConfig, ManagerTowerModel, exist_ok=True)


# So `AutoConfig` / `AutoModel` (and `AutoTokenizer`, which reads the config) know saved ManagerTower checkpoints.
_register_auto_classes()
