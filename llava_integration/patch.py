"""Apply, remove and configure the manager on an HF LLaVA-family model. Nothing is forked: see `runtime.py`."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from manager_plugin import LayerManagers, ManagerConfig

from .families import ModelFamily, family_named, family_of
from .image_modes import SQUARE, is_image_mode
from .runtime import ManagerRuntime

RUNTIME_ATTRIBUTE = "_manager_runtime"
CONFIG_ATTRIBUTE = "manager_config"


def llava_model(model: nn.Module) -> nn.Module:
    """The inner LLaVA-family model (`LlavaModel`, `LlavaOnevisionModel`, ...) of `model`, or a clear error."""
    return family_of(model)[1]


def resolve_manager_config(model_config, config: ManagerConfig) -> ManagerConfig:
    """`config` with its defaults resolved and checked against a LLaVA-family model config."""
    family = family_named(model_config.model_type)
    if config.model_family is not None and config.model_family != family.name:
        raise ValueError(
            f"this manager was made for {config.model_family} models, but the model is a {family.name} model "
            f"({family.model_class.__name__}): an adapter only fits the family it was trained on"
        )
    if config.modalities == "videos" and not family.videos:
        raise ValueError(
            f"modalities 'videos' asks the manager to act on videos only, but {family.model_class.__name__} takes no "
            "videos: use 'images' or 'both'"
        )
    feature_layer = getattr(model_config, family.feature_layer)
    if not isinstance(feature_layer, int):
        raise TypeError(
            f"the manager needs a single main vision feature layer, but {family.feature_layer} is {feature_layer!r}"
        )
    if config.grid_type == "grid" and _without_grid(family, model_config):
        images = "square images" if family.square_images else f"the images of {family.model_class.__name__}"
        raise ValueError(f"grid_type 'grid' manages the grid tokens, but {images} (no grid) have none")
    resolved = config.resolve(
        num_vision_hidden_states=model_config.vision_config.num_hidden_layers + 1,
        main_vision_layer=feature_layer,
        num_decoder_layers=model_config.text_config.num_hidden_layers,
        hidden_size=model_config.text_config.hidden_size,
    )
    return replace(resolved, model_family=family.name)


def _without_grid(family: ModelFamily, model_config) -> bool:
    """Whether every image is one crop: LLaVA-1.5, or OneVision set to square images."""
    return family.pack is None or (family.square_images and model_config.vision_aspect_ratio == SQUARE)


def manager_of(model: nn.Module) -> LayerManagers | None:
    """The `LayerManagers` applied to `model`, or None."""
    return getattr(llava_model(model), "manager", None)


def _runtime(inner: nn.Module, create: bool) -> ManagerRuntime | None:
    runtime = getattr(inner, RUNTIME_ATTRIBUTE, None)
    if runtime is None and create:
        runtime = ManagerRuntime(inner, family_of(inner)[0])
        runtime.install()
        setattr(inner, RUNTIME_ATTRIBUTE, runtime)
    return runtime


def _drop_runtime_if_idle(inner: nn.Module) -> None:
    runtime = _runtime(inner, create=False)
    square = getattr(inner.config, "vision_aspect_ratio", None) == SQUARE
    if runtime is not None and runtime.managers is None and not (runtime.family.square_images and square):
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
    family = family_of(inner)[0]
    resolved = resolve_manager_config(inner.config, config or ManagerConfig())
    reference = next(family.part(inner, "projector").parameters())
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
    """Choose how images become visual tokens: "square" (base view only, no grid) or "anyres_max_<N>" (AnyRes).

    LLaVA-OneVision only: LLaVA-1.5 always reads each image as one crop, LLaVA-NeXT always as its AnyRes grid."""
    family, inner = family_of(model)
    if not family.square_images:
        raise ValueError(
            f"image aspect ratio {mode!r}: {family.model_class.__name__} has one image mode (its own); only "
            "LlavaOnevisionForConditionalGeneration switches between square images and anyres_max_<N>"
        )
    if not is_image_mode(mode):
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
