"""Apply, remove and configure the manager on an HF LLaVA-OneVision model. Nothing is forked: see `runtime.py`."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from manager_plugin import LayerManagers, ManagerConfig

from .features import SQUARE
from .runtime import ManagerRuntime

RUNTIME_ATTRIBUTE = "_manager_runtime"
CONFIG_ATTRIBUTE = "manager_config"
_ANYRES_MAX = re.compile(r"anyres_max_(\d+)")


def llava_model(model: nn.Module) -> LlavaOnevisionModel:
    """The `LlavaOnevisionModel` inside `model`, or a clear error for any other model."""
    if isinstance(model, LlavaOnevisionForConditionalGeneration):
        return model.model
    if isinstance(model, LlavaOnevisionModel):
        return model
    raise TypeError(
        f"the manager patches LLaVA-OneVision: expected a LlavaOnevisionForConditionalGeneration or "
        f"LlavaOnevisionModel, got {type(model).__name__}"
    )


def resolve_manager_config(model_config, config: ManagerConfig) -> ManagerConfig:
    """`config` with its defaults resolved and checked against a `LlavaOnevisionConfig`."""
    feature_layer = model_config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise TypeError(
            f"the manager needs a single main vision feature layer, but vision_feature_layer is {feature_layer!r}"
        )
    if model_config.vision_aspect_ratio == SQUARE and config.grid_type == "grid":
        raise ValueError("grid_type 'grid' manages the grid tokens, but square images (no grid) have none")
    return config.resolve(
        num_vision_hidden_states=model_config.vision_config.num_hidden_layers + 1,
        main_vision_layer=feature_layer,
        num_decoder_layers=model_config.text_config.num_hidden_layers,
        hidden_size=model_config.text_config.hidden_size,
    )


def manager_of(model: nn.Module) -> LayerManagers | None:
    """The `LayerManagers` applied to `model`, or None."""
    return getattr(llava_model(model), "manager", None)


def _runtime(inner: LlavaOnevisionModel, create: bool) -> ManagerRuntime | None:
    runtime = getattr(inner, RUNTIME_ATTRIBUTE, None)
    if runtime is None and create:
        runtime = ManagerRuntime(inner)
        runtime.install()
        setattr(inner, RUNTIME_ATTRIBUTE, runtime)
    return runtime


def _drop_runtime_if_idle(inner: LlavaOnevisionModel) -> None:
    runtime = _runtime(inner, create=False)
    if runtime is not None and runtime.managers is None and inner.config.vision_aspect_ratio != SQUARE:
        runtime.uninstall()
        delattr(inner, RUNTIME_ATTRIBUTE)


def apply_manager(model: nn.Module, config: ManagerConfig | None = None) -> nn.Module:
    """Add zero-initialised managers to `model` in place (the result equals the base model) and return it.

    Manager parameters live under `model.manager` (their names hold "manager"), on the model's device and dtype;
    on a `meta` model they are created on `meta` and take their values when weights are loaded.
    """
    inner = llava_model(model)
    if getattr(inner, "manager", None) is not None:
        raise ValueError("this model already has a manager: call remove_manager(model) before applying another")
    resolved = resolve_manager_config(inner.config, config or ManagerConfig())
    reference = inner.multi_modal_projector.linear_1.weight
    with torch.device(reference.device):
        managers = LayerManagers(resolved)
    managers.to(reference.dtype)
    managers.train(inner.training)  # a new module defaults to training mode, which would jitter an eval model

    inner.add_module("manager", managers)
    _runtime(inner, create=True).attach_managers(managers)
    setattr(inner.config, CONFIG_ATTRIBUTE, resolved.to_dict())
    return model


def remove_manager(model: nn.Module) -> LayerManagers:
    """Take the managers off `model`, restoring its exact original behaviour; return the removed managers."""
    inner = llava_model(model)
    managers = getattr(inner, "manager", None)
    if managers is None:
        raise ValueError("this model has no manager to remove")
    _runtime(inner, create=False).detach_managers()
    del inner.manager
    if hasattr(inner.config, CONFIG_ATTRIBUTE):
        delattr(inner.config, CONFIG_ATTRIBUTE)
    _drop_runtime_if_idle(inner)
    return managers


def set_image_aspect_ratio(model: nn.Module, mode: str) -> nn.Module:
    """Choose how images become visual tokens: "square" (base view only, no grid) or "anyres_max_<N>" (AnyRes)."""
    inner = llava_model(model)
    if mode != SQUARE and not _ANYRES_MAX.fullmatch(mode):
        raise ValueError(
            f"unknown image aspect ratio {mode!r}: expected 'square' or 'anyres_max_<N>' (e.g. anyres_max_9)"
        )
    managers = getattr(inner, "manager", None)
    if mode == SQUARE and managers is not None and managers.config.grid_type == "grid":
        raise ValueError("grid_type 'grid' manages the grid tokens, but square images (no grid) have none")
    inner.config.vision_aspect_ratio = mode
    if mode == SQUARE:
        _runtime(inner, create=True)
    else:
        _drop_runtime_if_idle(inner)
    return model
