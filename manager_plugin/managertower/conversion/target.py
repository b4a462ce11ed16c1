"""The target configs: a ManagerTowerConfig (or HF BridgeTowerConfig) from the original config and tensor shapes."""

from __future__ import annotations

import re
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import BridgeTowerConfig, CLIPVisionConfig, RobertaConfig

from ...io import ConversionError
from ..configuration_managertower import ManagerTowerConfig
from .original import TEXT, VISION, OriginalConfig

# RoBERTa and CLIP use 64-wide attention heads at every size; the original state dict does not record head counts.
HEAD_WIDTH = 64
ENCODER_LAYER_NORM_EPS = 1e-5  # roberta-base/large and CLIP
LAYER_NORM_EPS = 1e-5  # the original managers, link towers and task heads, and HF BridgeTower
# The original cross-modal layers and MLM transform use BertConfig's default (HF BridgeTower's use 1e-5 instead).
CROSS_MODAL_LAYER_NORM_EPS = 1e-12


def _count(tensors: dict[str, torch.Tensor], pattern: str) -> int:
    return sum(1 for key in tensors if re.fullmatch(pattern, key))


def _shape(tensors: dict[str, torch.Tensor], key: str, needed_for: str) -> torch.Size:
    if key not in tensors:
        raise ConversionError(f"missing tensor in the checkpoint: {key!r} (needed to infer {needed_for})")
    return tensors[key].shape


def _heads_for(width: int, what: str) -> int:
    if width % HEAD_WIDTH:
        raise ConversionError(
            f"the {what} is {width} wide: its number of attention heads is not recorded, and {width} is not a "
            f"multiple of the {HEAD_WIDTH}-wide heads of RoBERTa and CLIP"
        )
    return width // HEAD_WIDTH


def text_config_from(tensors: dict[str, torch.Tensor]) -> RobertaConfig:
    """The RoBERTa config of the original `text_transformer` (a `RobertaModel.from_pretrained`), from its shapes."""
    vocab_size, width = _shape(tensors, TEXT + "embeddings.word_embeddings.weight", "the text encoder")
    return RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=_count(tensors, re.escape(TEXT) + r"encoder\.layer\.\d+\.attention\.self\.query\.weight"),
        num_attention_heads=_heads_for(width, "text encoder"),
        intermediate_size=_shape(tensors, TEXT + "encoder.layer.0.intermediate.dense.weight", "the text encoder")[0],
        max_position_embeddings=_shape(tensors, TEXT + "embeddings.position_embeddings.weight", "the text encoder")[0],
        type_vocab_size=_shape(tensors, TEXT + "embeddings.token_type_embeddings.weight", "the text encoder")[0],
        layer_norm_eps=ENCODER_LAYER_NORM_EPS,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def vision_config_from(tensors: dict[str, torch.Tensor], original: OriginalConfig, image_size: int) -> CLIPVisionConfig:
    """The CLIP ViT config of the original `vit_model.visual`, from its shapes, at `image_size`."""
    width, channels, patch, _ = _shape(tensors, VISION + "conv1.weight", "the vision encoder")
    if original.patch_size is not None and original.patch_size != patch:
        raise ConversionError(
            f"hyper-parameter patch_size {original.patch_size} differs from the {patch}x{patch} patches of "
            f"{VISION}conv1.weight"
        )
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=_shape(tensors, VISION + "transformer.resblocks.0.mlp.c_fc.weight", "the vision encoder")[0],
        num_hidden_layers=_count(tensors, re.escape(VISION) + r"transformer\.resblocks\.\d+\.attn\.in_proj_weight"),
        num_attention_heads=_heads_for(width, "vision encoder"),
        num_channels=channels,
        image_size=image_size,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=ENCODER_LAYER_NORM_EPS,
    )


def managertower_config(
    tensors: dict[str, torch.Tensor], original: OriginalConfig, head: str, image_size: int
) -> ManagerTowerConfig:
    """The `ManagerTowerConfig` of the original model (`bridge` managers for BridgeTower)."""
    extra: dict[str, Any] = {}
    if head == "vqav2":
        extra["num_labels"] = original.vqav2_label_size
    text, vision = text_config_from(tensors), vision_config_from(tensors, original, image_size)
    num_token_types = _shape(tensors, "token_type_embeddings.weight", "the number of token types")[0]
    try:
        return ManagerTowerConfig(
            hidden_size=original.hidden_size,
            num_hidden_layers=original.num_layers,
            num_attention_heads=original.num_heads,
            intermediate_size=original.hidden_size * original.mlp_ratio,
            hidden_act="gelu",
            hidden_dropout_prob=original.drop_rate,
            attention_probs_dropout_prob=original.drop_rate,
            layer_norm_eps=LAYER_NORM_EPS,
            cross_modal_layer_norm_eps=CROSS_MODAL_LAYER_NORM_EPS,
            num_token_types=num_token_types,
            manager_type=original.manager_type or "bridge",
            num_managed_layers=original.num_managed_layers,
            manager_temperature=original.manager_softmax_temperature,
            manager_query_mask=False,  # the original attends over text padding too
            contrastive_hidden_size=original.contrastive_hidden_size,
            contrastive_temperature=original.temperature,
            head_hidden_scale=original.head_hidden_scale,
            classifier_dropout=original.nlvr2_drop_rate,
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            **extra,
        )
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(
            f"the hyper-parameters and shapes do not make a valid ManagerTowerConfig: {error}"
        ) from error


def bridgetower_config(
    tensors: dict[str, torch.Tensor], original: OriginalConfig, image_size: int
) -> BridgeTowerConfig:
    """The HF `BridgeTowerConfig` of an original BridgeTower, if HF's BridgeTower can hold it."""
    text = text_config_from(tensors)
    vision = vision_config_from(tensors, original, image_size)
    # HF builds its cross-modal layers from the text encoder's config, so their sizes must coincide.
    for name, ours, theirs in (
        ("hidden_size", original.hidden_size, text.hidden_size),
        ("num_heads", original.num_heads, text.num_attention_heads),
        ("hidden_size * mlp_ratio", original.hidden_size * original.mlp_ratio, text.intermediate_size),
    ):
        if ours != theirs:
            raise ConversionError(
                f"cross-modal {name} {ours} differs from the text encoder's {theirs}: HF BridgeTower builds its "
                "cross-modal layers from the text config, so it cannot hold this model; use --format managertower"
            )
    return BridgeTowerConfig(
        hidden_size=original.hidden_size,
        num_hidden_layers=original.num_layers,
        num_attention_heads=original.num_heads,
        hidden_act="gelu",
        layer_norm_eps=LAYER_NORM_EPS,
        share_cross_modal_transformer_layers=True,
        share_link_tower_layers=False,
        link_tower_type="add",
        init_layernorm_from_vision_encoder=False,
        contrastive_hidden_size=original.contrastive_hidden_size,
        tie_word_embeddings=False,
        text_config={
            **text.to_dict(),
            "layer_norm_eps": LAYER_NORM_EPS,
            "hidden_dropout_prob": original.drop_rate,
            "attention_probs_dropout_prob": original.drop_rate,
        },
        vision_config={
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_channels": vision.num_channels,
            "patch_size": vision.patch_size,
            "image_size": image_size,
            "layer_norm_eps": ENCODER_LAYER_NORM_EPS,
            "share_layernorm": True,
            "remove_last_layer": False,
        },
    )
