"""What each manager learned: per injection layer, the share of weight it gives to each vision layer, as a heatmap.

Read from a merged checkpoint (`config.json` with `manager_config`, weights under `model.manager.*`) or a manager
adapter (`manager_config.json` + `manager.safetensors`) without loading the model. A static manager's weight for
vision layer n is the mean |w_n| over channels; an adaptive manager's is the mean |gate_n| over channels (its
per-token controller scores depend on the input and are not part of the picture). The figure shows these magnitudes
as they are (a trained manager's are small, ~1e-3) next to each injection layer's shares (summing to 1); a manager
whose weights are all 0 (freshly applied, untrained) has no shares and says so. The manager at decoder layer 0 has no
weight for the last vision layer (left blank).
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


def layer_magnitudes(config: ManagerConfig, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """(injection layers, vision layers): each manager's mean |weight| per vision layer over channels; NaN if absent."""
    magnitudes = np.full((len(config.injection_layers), len(config.vision_layers)), np.nan)
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
        magnitudes[slot, : magnitude.shape[0]] = magnitude
    return magnitudes


def layer_shares(magnitudes: np.ndarray) -> np.ndarray:
    """Each row of `magnitudes` as shares summing to 1; a row of zeros (an untrained manager) has no shares (NaN)."""
    totals = np.nansum(magnitudes, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, magnitudes / np.where(totals > 0, totals, 1.0), np.nan)


def _heatmap(axis, figure, values: np.ndarray, config: ManagerConfig, label: str, text: str, scale_max: float) -> None:
    """One panel: decoder (injection) layers down, vision layers across, each cell's value printed."""
    image = axis.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=scale_max, aspect="auto")
    axis.set_xticks(range(values.shape[1]), [str(layer) for layer in config.vision_layers])
    axis.set_yticks(range(values.shape[0]), [str(layer) for layer in config.injection_layers])
    axis.set_xlabel("vision layer (hidden-state index)")
    for row in range(values.shape[0]):
        for column in range(values.shape[1]):
            value = values[row, column]
            shown = format(value, text) if np.isfinite(value) else "n/a"
            colour = "grey" if not np.isfinite(value) else "black" if value > scale_max / 2 else "white"
            axis.text(column, row, shown, ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axis, label=label)


def plot_heatmap(config: ManagerConfig, magnitudes: np.ndarray, path: Path, title: str) -> Path:
    """The weights' real magnitudes (left) next to each injection layer's shares (right), as heatmaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = layer_shares(magnitudes)
    rows, columns = magnitudes.shape
    figure, (magnitude_ax, share_ax) = plt.subplots(
        1, 2, figsize=(2 * max(6.5, 2.2 + 0.7 * columns), 2.8 + 0.55 * rows), sharey=True
    )
    largest = float(np.nanmax(magnitudes)) if np.isfinite(magnitudes).any() else 0.0
    _heatmap(magnitude_ax, figure, magnitudes, config, "mean |weight|", ".2g", largest or 1.0)
    top_share = float(np.nanmax(shares)) if np.isfinite(shares).any() else 1.0
    _heatmap(share_ax, figure, shares, config, "share of the row's weight", ".2f", top_share)
    magnitude_ax.set_ylabel("decoder layer (injection)")
    magnitude_ax.set_title(f"real magnitude (largest {largest:.3g})", fontsize=10)
    untrained = np.isnan(shares).all(axis=1)
    if untrained.all():
        share_ax.set_title("shares: none, every weight is 0 (untrained)", fontsize=10, color="firebrick")
    elif untrained.any():
        share_ax.set_title("shares: each row sums to 1 (n/a rows: all weights 0)", fontsize=10)
    else:
        share_ax.set_title("shares: each row sums to 1", fontsize=10)
    figure.suptitle(title, fontsize=10, color="firebrick" if untrained.all() else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _write_table(config: ManagerConfig, values: np.ndarray, path: Path, digits: str) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["decoder_layer", *(f"vision_{layer}" for layer in config.vision_layers)])
        for layer, row in zip(config.injection_layers, values):
            writer.writerow([layer, *("" if np.isnan(value) else format(value, digits) for value in row)])
    return path


def write_manager_weights(checkpoint: str | Path, out: str | Path) -> list[Path]:
    """Heatmap (PNG) and tables (CSV: shares, and the mean |weight| itself) of the manager in `checkpoint`."""
    config, tensors = read_manager(checkpoint)
    magnitudes = layer_magnitudes(config, tensors)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "mean |w|" if config.manager_type == "static" else "mean |gate| (decoder layer 0: mean |w|)"
    name = Path(checkpoint).resolve().name
    if np.nansum(magnitudes) == 0:
        title = f"The {config.manager_type} manager of {name} is untrained: all its weights are 0, it adds nothing"
    else:
        title = f"What the {config.manager_type} manager of {name} learned: per vision layer, {kind} over channels"
    return [
        plot_heatmap(config, magnitudes, out / "manager_weights.png", title),
        _write_table(config, layer_shares(magnitudes), out / "manager_weights.csv", ".6f"),
        _write_table(config, magnitudes, out / "manager_weight_magnitudes.csv", ".6g"),
    ]
