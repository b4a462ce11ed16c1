"""`ManagerTowerConfig`: the single source of truth for a Two-Tower ManagerTower, validated when it is built."""

from __future__ import annotations

from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, PreTrainedConfig, RobertaConfig
from transformers.configuration_utils import SubConfigSpec

# RoBERTa-base and CLIP-ViT-B/16 at 288 px: the uni-modal encoders of ManagerTower-base (and BridgeTower-base).
ROBERTA_BASE = {
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
}
CLIP_VIT_B16_288 = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 288,
    "patch_size": 16,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


@strict
class ManagerTowerConfig(PreTrainedConfig):
    r"""
    A RoBERTa text encoder and a CLIP vision encoder, topped by `num_hidden_layers` cross-modal layers (width
    `hidden_size`). The input of cross-modal layer l, for each modality, is made by a manager from the top
    `num_managed_layers` uni-modal layers (the "experts") and, after the first layer, from the previous cross-modal
    outputs.

    manager_type (`str`, defaults to `"AAUE"`):
        `"SAUE"` (static managers everywhere), `"AAUE"` (static in the first cross-modal layer, adaptive after) or
        `"bridge"` (cross-modal layer l takes one uni-modal layer: exactly BridgeTower).
    num_managed_layers (`int`, *optional*):
        How many top uni-modal layers of each encoder the managers see; defaults to `num_hidden_layers`.
    manager_temperature (`float`, defaults to 1.0):
        Initial value of the learnable softmax temperature of the static and adaptive managers.
    manager_query_mask (`bool`, defaults to `False`):
        Whether the adaptive image managers ignore text padding when attending over the text stream. The reference
        attends over padding too, so checkpoints trained with it expect `False`.
    num_token_types (`int`, defaults to 2):
        Modality-type embeddings: 0 = text, 1 = image (NLVR2 adds 2 for its second image).
    contrastive_hidden_size (`int`, defaults to 256):
        Width of the image-text contrastive (ITC) projections of the retrieval head.
    contrastive_temperature (`float`, defaults to 0.07):
        Initial ITC temperature.
    head_hidden_scale (`int`, defaults to 1):
        The hidden width of the classification heads is `2 * hidden_size * head_hidden_scale`.
    classifier_dropout (`float`, defaults to 0.0):
        Dropout on the pooled features before the NLVR2 classifier.
    cross_modal_layer_norm_eps (`float`, *optional*):
        LayerNorm epsilon of the cross-modal layers and the MLM transform; defaults to `layer_norm_eps` (1e-5, as HF
        BridgeTower). Checkpoints converted from the authors' code set 1e-12, their BertConfig's value.
    """

    model_type = "managertower"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "text_config": SubConfigSpec(RobertaConfig, init_kwargs=ROBERTA_BASE),
        "vision_config": SubConfigSpec(CLIPVisionConfig, init_kwargs=CLIP_VIT_B16_288),
    }

    hidden_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    num_token_types: int = 2
    manager_type: str = "AAUE"
    num_managed_layers: int | None = None
    manager_temperature: float | int = 1.0
    manager_query_mask: bool = False
    contrastive_hidden_size: int = 256
    contrastive_temperature: float = 0.07
    head_hidden_scale: int = 1
    classifier_dropout: float | int = 0.0
    cross_modal_layer_norm_eps: float | None = None
    tie_word_embeddings: bool = False
    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None

    def __post_init__(self, **kwargs):
        # A partial dict changes only the fields it names: {"image_size": 576} keeps CLIP-B/16's patch size.
        if isinstance(self.text_config, dict):
            self.text_config = {**ROBERTA_BASE, **self.text_config}
        if isinstance(self.vision_config, dict):
            self.vision_config = {**CLIP_VIT_B16_288, **self.vision_config}
        if self.num_managed_layers is None:
            self.num_managed_layers = self.num_hidden_layers
        if self.cross_modal_layer_norm_eps is None:
            self.cross_modal_layer_norm_eps = self.layer_norm_eps
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: every size and count the model reads is consistent."""
        from .managers import MANAGER_TOWER_TYPES  # the registry lives beside the classes it names

        if self.manager_type not in MANAGER_TOWER_TYPES:
            raise ValueError(
                f"unknown manager_type {self.manager_type!r}: expected one of {sorted(MANAGER_TOWER_TYPES)}"
            )
        text, vision = self.text_config, self.vision_config
        if text.num_hidden_layers != vision.num_hidden_layers:
            raise ValueError(
                f"the text encoder has {text.num_hidden_layers} layers but the vision encoder has "
                f"{vision.num_hidden_layers}: ManagerTower walks both encoders in step, so they must match"
            )
        image_size, patch_size = vision.image_size, vision.patch_size
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            raise TypeError(f"image_size and patch_size must be ints, got {image_size!r} and {patch_size!r}")
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not divisible by patch_size {patch_size}: expected a multiple of "
                f"{patch_size} (e.g. {image_size - image_size % patch_size or patch_size})"
            )
        if not 1 <= self.num_hidden_layers <= text.num_hidden_layers:
            raise ValueError(
                f"num_hidden_layers {self.num_hidden_layers} cross-modal layers: expected 1.."
                f"{text.num_hidden_layers} (the uni-modal encoders have {text.num_hidden_layers} layers)"
            )
        if not 1 <= self.num_managed_layers <= text.num_hidden_layers:
            raise ValueError(
                f"num_managed_layers {self.num_managed_layers}: expected 1..{text.num_hidden_layers} (the uni-modal "
                f"encoders have {text.num_hidden_layers} layers)"
            )
        if self.manager_type == "bridge" and self.num_managed_layers < self.num_hidden_layers:
            raise ValueError(
                f"manager_type 'bridge' feeds cross-modal layer l from uni-modal layer L - {self.num_hidden_layers} + l, "
                f"so it needs num_managed_layers >= num_hidden_layers ({self.num_hidden_layers}), "
                f"got {self.num_managed_layers}"
            )
        for name, width, heads in (
            ("cross-modal", self.hidden_size, self.num_attention_heads),
            ("text", text.hidden_size, text.num_attention_heads),
            ("vision", vision.hidden_size, vision.num_attention_heads),
        ):
            if width % heads:
                raise ValueError(f"the {name} hidden size {width} is not a multiple of its {heads} attention heads")
        if self.num_token_types < 2:
            raise ValueError(f"num_token_types must be at least 2 (text and image), got {self.num_token_types}")
        if self.manager_temperature <= 0:
            raise ValueError(f"manager_temperature must be positive, got {self.manager_temperature}")
        if self.head_hidden_scale < 1:
            raise ValueError(f"head_hidden_scale must be a positive int, got {self.head_hidden_scale}")


__all__ = ["ManagerTowerConfig"]
