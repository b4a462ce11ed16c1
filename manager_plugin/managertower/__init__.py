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
from .processing_managertower import ManagerTowerImageProcessor, ManagerTowerProcessor
from .retrieval import RetrievalRanking, encode_corpus, rank, recall_at_k, rerank_scores

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
    "ManagerTowerImageProcessor",
    "ManagerTowerModel",
    "ManagerTowerModelOutput",
    "ManagerTowerPreTrainedModel",
    "ManagerTowerPreTrainingOutput",
    "ManagerTowerProcessor",
    "ManagerTowerTaskOutput",
    "RetrievalRanking",
    "StaticAggregation",
    "UnimodalEncoding",
    "encode_corpus",
    "rank",
    "recall_at_k",
    "rerank_scores",
]


def _register_auto_classes() -> None:
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForPreTraining,
        AutoModelForVisualQuestionAnswering,
        AutoProcessor,
    )

    AutoConfig.register(ManagerTowerConfig.model_type, ManagerTowerConfig, exist_ok=True)
    AutoModel.register(ManagerTowerConfig, ManagerTowerModel, exist_ok=True)
    # The heads with an HF Auto class; SNLI-VE, NLVR2 and retrieval have none (HF has no Auto class for those tasks).
    AutoModelForPreTraining.register(ManagerTowerConfig, ManagerTowerForPreTraining, exist_ok=True)
    AutoModelForVisualQuestionAnswering.register(
        ManagerTowerConfig, ManagerTowerForVisualQuestionAnswering, exist_ok=True
    )
    AutoImageProcessor.register(
        ManagerTowerConfig, image_processor_classes={"pil": ManagerTowerImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(ManagerTowerConfig, ManagerTowerProcessor, exist_ok=True)


# So the Auto classes know saved ManagerTower checkpoints: `AutoConfig`, `AutoModel` and the heads' Auto classes
# (`AutoTokenizer` reads the config), `AutoImageProcessor` and `AutoProcessor`.
_register_auto_classes()
