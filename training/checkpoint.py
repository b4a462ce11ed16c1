"""Checkpoint files, written so that no reader ever sees a half-written one; LoRA weights merged into a full model.

A checkpoint directory is assembled under a staging name and renamed into place in one step. The final model of a
stage goes into the output directory (which also holds the checkpoints), so its files are moved in one by one with
`config.json` last: until that last move the directory holds no loadable model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

STAGING_PREFIX = ".partial-"
CONFIG_FILE = "config.json"


def staging_dir(final: str | Path) -> Path:
    """The staging directory beside `final` (a hidden name that checkpoint discovery ignores)."""
    final = Path(final)
    return final.parent / f"{STAGING_PREFIX}{final.name}"


def replace_dir(staging: str | Path, final: str | Path) -> Path:
    """Rename the finished `staging` directory to `final`, replacing an existing `final` as a whole."""
    staging, final = Path(staging), Path(final)
    old = final.parent / f"{STAGING_PREFIX}{final.name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def publish_files(staging: str | Path, directory: str | Path, last: str = CONFIG_FILE) -> Path:
    """Move everything in `staging` into `directory`, removing its old `last` file first and moving `last` last."""
    staging, directory = Path(staging), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / last).unlink(missing_ok=True)
    entries = sorted(staging.iterdir(), key=lambda entry: entry.name == last)
    for entry in entries:
        target = directory / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    return directory


def lora_scalings(model: torch.nn.Module, adapter: str = "default") -> dict[str, float]:
    """`{module name: scaling}` of each LoRA layer of a PEFT model (the names its state dict uses)."""
    return {
        name: float(module.scaling[adapter])
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and adapter in getattr(module, "scaling", {})
    }


def merged_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor], scalings: Mapping[str, float], adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """The full model's state dict with each LoRA update `scaling * B @ A` merged into its base weight.

    `state_dict` is a PEFT model's (keys under `base_model.model.`, bases under `.base_layer.`); the result has the
    plain model's keys, ready for `save_pretrained(state_dict=...)`. Works on gathered (ZeRO-3) weights too.
    """
    merged: dict[str, torch.Tensor] = {}
    lora_keys = set()
    for module, scaling in scalings.items():
        a, b = f"{module}.lora_A.{adapter}.weight", f"{module}.lora_B.{adapter}.weight"
        base = f"{module}.base_layer.weight"
        if a not in state_dict or b not in state_dict or base not in state_dict:
            raise KeyError(f"LoRA module {module} lacks {a}, {b} or {base} in the state dict")
        weight = state_dict[base]
        delta = (state_dict[b].float() @ state_dict[a].float()) * scaling
        merged[base] = (weight.float() + delta).to(weight.dtype)
        lora_keys |= {a, b}
    for key, tensor in state_dict.items():
        if key not in lora_keys and key not in merged:
            merged[key] = tensor
    prefix = "base_model.model."
    return {key.removeprefix(prefix).replace(".base_layer.", "."): tensor for key, tensor in merged.items()}


def manager_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The manager's weights in a full model's state dict, keyed as `LayerManagers.state_dict()` keys them."""
    marker = "manager."
    return {key.split(marker, 1)[1]: tensor for key, tensor in state_dict.items() if f".{marker}" in f".{key}"}
