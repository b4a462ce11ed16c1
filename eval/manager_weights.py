"""What each manager learned: per injection layer, the share of weight it gives to each vision layer, as a heatmap.

Read from a merged checkpoint (`config.json` with `manager_config`, weights under `model.manager.*`) or a manager
adapter (`manager_config.json` + `manager.safetensors`) without loading the model. A static manager's weight for
vision layer n is the mean |w_n| over channels; an adaptive manager's is the mean |gate_n| over channels (its
per-token controller scores depend on the input and are not part of the picture). Each injection layer's weights are
normalised to sum to 1; the manager at decoder layer 0 has no weight for the last vision layer (left blank).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from llava_integration.adapter import WEIGHTS_NAME
from manager_plugin import CONFIG_NAME, ManagerConfig

MERGED_PREFIX = "model.manager."
STATE_NAMES = ("layer_weights", "gate")  # StaticManager, AdaptiveManager: (N, D) per-layer, per-channel weights


def _merged_weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({directory / name for key, name in weight_map.items() if key.startswith(MERGED_PREFIX)})
    return [directory / "model.safetensors"]


def _read_tensors(files: list[Path], prefix: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"missing weights file {file}")
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if key.startswith(prefix):
                    tensors[key[len(prefix) :]] = handle.get_tensor(key)
    return tensors


def read_manager(checkpoint: str | Path) -> tuple[ManagerConfig, dict[str, torch.Tensor]]:
    """The manager's config and state dict (keys as in `LayerManagers.state_dict()`) in a checkpoint or adapter."""
    directory = Path(checkpoint)
    if (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file():
        return ManagerConfig.load(directory), _read_tensors([directory / WEIGHTS_NAME], "")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory} is neither a manager adapter ({CONFIG_NAME} + {WEIGHTS_NAME}) nor a checkpoint (config.json)"
        )
    recorded = json.loads(config_path.read_text()).get("manager_config")
    if not recorded:
        raise ValueError(f"{directory} is a checkpoint without a manager (its config.json has no manager_config)")
    tensors = _read_tensors(_merged_weight_files(directory), MERGED_PREFIX)
    if not tensors:
        raise ValueError(f"{directory}: config.json records a manager but no weights start with {MERGED_PREFIX!r}")
    return ManagerConfig.from_dict(recorded), tensors


def layer_shares(config: ManagerConfig, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """(injection layers, vision layers): each manager's normalised mean |weight| per vision layer; NaN if absent."""
    shares = np.full((len(config.injection_layers), len(config.vision_layers)), np.nan)
    for slot, layer in enumerate(config.injection_layers):
        found = [f"managers.{slot}.{name}" for name in STATE_NAMES if f"managers.{slot}.{name}" in tensors]
        if not found:
            raise ValueError(f"no {' or '.join(STATE_NAMES)} for the manager of decoder layer {layer} (slot {slot})")
        magnitude = tensors[found[0]].float().abs().mean(dim=-1).numpy()
        if magnitude.shape[0] != config.num_experts(layer):
            raise ValueError(
                f"the manager of decoder layer {layer} has {magnitude.shape[0]} vision layers, expected "
                f"{config.num_experts(layer)}"
            )
        total = magnitude.sum()
        shares[slot, : magnitude.shape[0]] = magnitude / total if total > 0 else 0.0
    return shares


def plot_heatmap(config: ManagerConfig, shares: np.ndarray, path: Path, title: str) -> Path:
    """The shares as a heatmap: decoder (injection) layers down, vision layers across, each cell's value printed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = shares.shape
    figure, axis = plt.subplots(figsize=(max(6.5, 2.2 + 0.7 * columns), 2.4 + 0.55 * rows))
    image = axis.imshow(np.ma.masked_invalid(shares), cmap="viridis", vmin=0, aspect="auto")
    axis.set_xticks(range(columns), [str(layer) for layer in config.vision_layers])
    axis.set_yticks(range(rows), [str(layer) for layer in config.injection_layers])
    axis.set_xlabel("vision layer (hidden-state index)")
    axis.set_ylabel("decoder layer (injection)")
    threshold = np.nanmax(shares) / 2 if np.isfinite(shares).any() else 0
    for row in range(rows):
        for column in range(columns):
            value = shares[row, column]
            if np.isfinite(value):
                axis.text(
                    column,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if value > threshold else "white",
                )
            else:
                axis.text(column, row, "n/a", ha="center", va="center", fontsize=8, color="grey")
    figure.colorbar(image, ax=axis, label="share of the manager's weight")
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_manager_weights(checkpoint: str | Path, out: str | Path) -> list[Path]:
    """Heatmap (PNG) and table (CSV) of what the manager in `checkpoint` learned, written to `out`."""
    config, tensors = read_manager(checkpoint)
    shares = layer_shares(config, tensors)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "mean |w|" if config.manager_type == "static" else "mean |gate| (decoder layer 0: mean |w|)"
    title = (
        f"What the {config.manager_type} manager of {Path(checkpoint).resolve().name} learned\n"
        f"per vision layer: {kind} over channels\neach row (injection layer) sums to 1"
    )
    png = plot_heatmap(config, shares, out / "manager_weights.png", title)
    table = out / "manager_weights.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["decoder_layer", *(f"vision_{layer}" for layer in config.vision_layers)])
        for layer, values in zip(config.injection_layers, shares):
            writer.writerow([layer, *("" if np.isnan(value) else f"{value:.6f}" for value in values)])
    return [png, table]
