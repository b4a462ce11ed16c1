"""Reading checkpoint weights: safetensors or `.bin`, single or sharded."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from manager_plugin.io import ConversionError

# In the order they are looked for: an index names the shards of a sharded checkpoint.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a clear error."""
    if not path.is_file():
        raise ConversionError(f"missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a `.bin` file, unpickled with `weights_only=True`: a pickle that needs code is refused."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(
            f"{path} is a pickle that would need arbitrary code to load ({reason}); refusing it. Only plain tensor "
            "checkpoints load with weights_only=True: re-save it as safetensors where you trust its code"
        ) from error
    if not isinstance(data, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in data.items()
    ):
        raise ConversionError(f"{path} must hold a flat state dict (name -> tensor), got {type(data).__name__}")
    return dict(data)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"missing weight file {path}")
    if path.suffix == ".safetensors":
        return load_file(path)
    return load_pickled_weights(path)


def _load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index_path} has no weight_map (tensor name -> shard file)")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        loaded = _load_file(index_path.parent / shard)
        wanted = {name for name, file in weight_map.items() if file == shard}
        absent = sorted(wanted - set(loaded))
        if absent:
            raise ConversionError(f"shard {shard} lacks tensors that {index_path.name} places in it: {absent[:5]}")
        tensors.update({name: loaded[name] for name in wanted})
    return tensors


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `directory`, from the first weight file of `WEIGHT_FILES` found there."""
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            return _load_sharded(path) if name.endswith(".index.json") else _load_file(path)
    raise ConversionError(f"no weights in {directory}: expected one of {list(WEIGHT_FILES)}")
