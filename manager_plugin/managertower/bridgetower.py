"""HF BridgeTower -> ManagerTower in `bridge` mode: the config and the weight names.

BridgeTower's vision tower is CLIP's ViT written with `nn.MultiheadAttention`; ours is HF `CLIPVisionModel`, so the
fused `in_proj` is split into q/k/v and the block names are renamed. Its first-layer LayerNorms and its link-tower
LayerNorms become the LayerNorms of the one-hot `bridge` managers. The RoBERTa pooler, which BridgeTower builds but
never uses, is dropped.
"""

from __future__ import annotations

import re

import torch
from transformers import BridgeTowerConfig, CLIPVisionConfig, RobertaConfig

from .configuration_managertower import ManagerTowerConfig

_VISION_RENAMES = (
    ("vision_model.visual.embeddings.", "vision_model.embeddings."),
    ("vision_model.visual.ln_pre.", "vision_model.pre_layrnorm."),
    ("vision_model.visual.ln_post.", "vision_model.post_layernorm."),
    ("vision_model.visual.transformer.resblocks.", "vision_model.encoder.layers."),
    (".attn.out_proj.", ".self_attn.out_proj."),
    (".ln_1.", ".layer_norm1."),
    (".ln_2.", ".layer_norm2."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
)
_IN_PROJ = re.compile(r"^vision_model\.visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_LINK_TOWER = re.compile(r"^cross_modal_(text|image)_link_tower\.(\d+)\.LayerNorm\.(weight|bias)$")
_FIRST_NORM = re.compile(r"^cross_modal_(text|image)_layernorm\.(weight|bias)$")


def _check_supported(config: BridgeTowerConfig) -> None:
    vision, text = config.vision_config, config.text_config
    unsupported = {
        "link_tower_type": (config.link_tower_type, "add"),
        "share_cross_modal_transformer_layers": (config.share_cross_modal_transformer_layers, True),
        # HF's BridgeTowerModel itself cannot run with a shared link tower (it indexes it per layer).
        "share_link_tower_layers": (config.share_link_tower_layers, False),
        "vision_config.share_layernorm": (vision.share_layernorm, True),
        "vision_config.remove_last_layer": (vision.remove_last_layer, False),
    }
    for name, (value, expected) in unsupported.items():
        if value != expected:
            raise ValueError(
                f"BridgeTower with {name}={value!r} has no ManagerTower equivalent (expected {expected!r})"
            )
    if config.hidden_size != text.hidden_size:
        raise ValueError(
            f"BridgeTower hidden_size {config.hidden_size} differs from its text width {text.hidden_size}: HF builds its "
            "cross-modal layers from the text config, so such a model is inconsistent"
        )
    if config.layer_norm_eps != text.layer_norm_eps:
        raise ValueError(
            f"BridgeTower layer_norm_eps {config.layer_norm_eps} differs from its text layer_norm_eps "
            f"{text.layer_norm_eps}: ManagerTower uses one epsilon for its cross-modal layers and managers"
        )
    if text.num_hidden_layers != vision.num_hidden_layers:
        raise ValueError(
            f"BridgeTower text encoder has {text.num_hidden_layers} layers and vision encoder "
            f"{vision.num_hidden_layers}: expected the same number"
        )


def config_from_bridgetower(
    bridgetower: BridgeTowerConfig, config: ManagerTowerConfig | None = None
) -> ManagerTowerConfig:
    """The `bridge`-mode config with BridgeTower's shapes; a given `config` is checked against them instead."""
    _check_supported(bridgetower)
    text, vision = bridgetower.text_config, bridgetower.vision_config
    derived = ManagerTowerConfig(
        hidden_size=bridgetower.hidden_size,
        num_hidden_layers=bridgetower.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        intermediate_size=text.intermediate_size,
        hidden_act=text.hidden_act,
        hidden_dropout_prob=text.hidden_dropout_prob,
        attention_probs_dropout_prob=text.attention_probs_dropout_prob,
        layer_norm_eps=bridgetower.layer_norm_eps,
        manager_type="bridge",
        num_managed_layers=bridgetower.num_hidden_layers,
        text_config=RobertaConfig(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            intermediate_size=text.intermediate_size,
            hidden_act=text.hidden_act,
            hidden_dropout_prob=text.hidden_dropout_prob,
            attention_probs_dropout_prob=text.attention_probs_dropout_prob,
            max_position_embeddings=text.max_position_embeddings,
            type_vocab_size=text.type_vocab_size,
            layer_norm_eps=text.layer_norm_eps,
            pad_token_id=text.pad_token_id,
            bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=vision.hidden_size,
            intermediate_size=4 * vision.hidden_size,
            num_hidden_layers=vision.num_hidden_layers,
            num_attention_heads=vision.hidden_size // 64,  # BridgeTower's ViT uses 64-wide heads
            num_channels=vision.num_channels,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            hidden_act="quick_gelu",
            layer_norm_eps=vision.layer_norm_eps,
        ),
    )
    if config is None:
        return derived
    if config.manager_type != "bridge":
        raise ValueError(
            f"BridgeTower weights fit manager_type 'bridge', got config.manager_type {config.manager_type!r}"
        )
    for scope, ours, theirs in (
        ("", config, derived),
        ("text_config.", config.text_config, derived.text_config),
        ("vision_config.", config.vision_config, derived.vision_config),
    ):
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "type_vocab_size",
            "image_size",
            "patch_size",
            "num_managed_layers",
        ):
            if hasattr(theirs, name) and getattr(ours, name) != getattr(theirs, name):
                raise ValueError(
                    f"the BridgeTower model has {scope}{name} {getattr(theirs, name)} but the given config has "
                    f"{getattr(ours, name)}: expected the same shapes"
                )
    return config


def state_dict_from_bridgetower(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BridgeTower's `state_dict` under ManagerTower's names."""
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("text_model.pooler."):
            continue
        if match := _IN_PROJ.match(key):
            layer, kind = match.groups()
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                mapped[f"vision_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
            continue
        if match := _FIRST_NORM.match(key):
            modality, kind = match.groups()
            mapped[f"cross_modal_{modality}_managers.0.norm.{kind}"] = value
            continue
        if match := _LINK_TOWER.match(key):
            modality, index, kind = match.groups()
            mapped[f"cross_modal_{modality}_managers.{int(index) + 1}.norm.{kind}"] = value
            continue
        if key.startswith("vision_model.visual."):
            for old, new in _VISION_RENAMES:
                key = key.replace(old, new)
        mapped[key] = value
    return mapped
