"""The manager as an adapter: `manager_config.json` + `manager.safetensors`, saved and loaded beside a base model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from manager_plugin import CONFIG_NAME, LayerManagers, ManagerConfig
from manager_plugin.io import write_atomically

from .patch import apply_manager, manager_of, remove_manager, resolve_manager_config

WEIGHTS_NAME = "manager.safetensors"


def _require_manager(model: nn.Module) -> LayerManagers:
    managers = manager_of(model)
    if managers is None:
        raise ValueError("this model has no manager: call apply_manager(model) or load_manager(model, directory)")
    return managers


def save_manager(model: nn.Module, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the manager adapter of `model` to `directory`; `state_dict` overrides the weights (e.g. gathered ones)."""
    managers = _require_manager(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = managers.state_dict() if state_dict is None else state_dict
    meta = [name for name, tensor in tensors.items() if tensor.is_meta]
    if meta:
        raise ValueError(f"cannot save manager weights that live on the meta device: {meta}")
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    write_atomically(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_NAME, lambda path: Path(path).write_text(managers.config.to_json_string()))
    return directory


def load_manager(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the adapter saved in `directory` to `model` (or load it into the matching manager it has)."""
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no manager weights at {weights}")
    config = ManagerConfig.load(directory)
    existing = manager_of(model)
    if existing is not None:
        wanted = resolve_manager_config(model.config, config)
        if existing.config != wanted:
            raise ValueError(
                f"this model already has a manager {existing.config}, which differs from the adapter in {directory} "
                f"({wanted}): call remove_manager(model) first"
            )
    else:
        apply_manager(model, config)
    try:
        load_manager_weights(manager_of(model), load_file(weights), source=str(weights))
    except BaseException:
        if existing is None:
            remove_manager(model)
        raise
    return model


def load_manager_weights(managers: LayerManagers, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `managers`, checking names and shapes first so that nothing is half-loaded."""
    expected = managers.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"manager weights in {source} do not fit this manager: missing {missing}, unexpected {unexpected}"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"manager weight {name} in {source} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    on_meta = any(parameter.is_meta for parameter in managers.parameters())
    if on_meta:
        managers.load_state_dict(tensors, assign=True)
    else:
        reference = next(iter(expected.values()))
        managers.load_state_dict({k: v.to(reference.device, reference.dtype) for k, v in tensors.items()})
