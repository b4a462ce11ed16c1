"""`ManagerConfig`: the single source of truth for a manager plugin, validated once, JSON round-trippable."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

GRID_TYPES = ("all", "main", "grid")
MODALITIES = ("images", "videos", "both")
CONFIG_NAME = "manager_config.json"


def _check_layer_list(name: str, layers: Any) -> list[int] | None:
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"{name} must be a list of ints, got {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"{name} must not be empty")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{name} must hold ints, got {layer!r} in {layers}")
        if layer < 0:
            raise ValueError(f"{name} must hold non-negative hidden-state indices, got {layer} in {layers}")
    if any(b <= a for a, b in pairwise(layers)):
        raise ValueError(f"{name} must be strictly increasing, got {layers}")
    return layers


@dataclass
class ManagerConfig:
    """What a manager aggregates, where it injects, and how.

    `vision_layers` are hidden-state indices of the vision tower (0 = embeddings), `injection_layers` are indices of
    the decoder layers whose input receives the manager's output. Either may be left `None`; `resolve` fills them in
    from the model (the paper's defaults: the top half of the tower below its main feature, every 4th decoder layer).
    `modalities` says whose visual tokens the manager serves (images, video frames, or both); `model_family` names
    the model family (HF `model_type`) the manager was made for, filled in when it is applied, so that an adapter
    refuses a model of another family.
    """

    vision_layers: list[int] | None = None
    injection_layers: list[int] | None = None
    manager_type: str = "static"
    grid_type: str = "all"
    jitter: float = 0.01
    hidden_size: int | None = None
    modalities: str = "both"
    model_family: str | None = None
    injection_interval: int = field(default=4, repr=False)

    def __post_init__(self) -> None:
        from .managers import MANAGER_TYPES  # the registry lives beside the classes it names

        self.vision_layers = _check_layer_list("vision_layers", self.vision_layers)
        self.injection_layers = _check_layer_list("injection_layers", self.injection_layers)
        if self.manager_type not in MANAGER_TYPES:
            raise ValueError(f"unknown manager_type {self.manager_type!r}: expected one of {sorted(MANAGER_TYPES)}")
        if self.grid_type not in GRID_TYPES:
            raise ValueError(f"unknown grid_type {self.grid_type!r}: expected one of {list(GRID_TYPES)}")
        if self.modalities not in MODALITIES:
            raise ValueError(f"unknown modalities {self.modalities!r}: expected one of {list(MODALITIES)}")
        if self.model_family is not None and (not isinstance(self.model_family, str) or not self.model_family):
            raise ValueError(f"model_family must be a model type name or None, got {self.model_family!r}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)) or not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be a number in [0, 1), got {self.jitter!r}")
        self.jitter = float(self.jitter)
        if self.hidden_size is not None and (not isinstance(self.hidden_size, int) or self.hidden_size <= 0):
            raise ValueError(f"hidden_size must be a positive int, got {self.hidden_size!r}")
        if not isinstance(self.injection_interval, int) or self.injection_interval <= 0:
            raise ValueError(f"injection_interval must be a positive int, got {self.injection_interval!r}")
        if self.vision_layers is not None and 0 in (self.injection_layers or []) and len(self.vision_layers) < 2:
            raise ValueError(
                "injection at decoder layer 0 uses one vision layer fewer than the others (the layer-0 rule), "
                f"so it needs at least 2 vision_layers, got {self.vision_layers}"
            )

    @property
    def is_resolved(self) -> bool:
        return None not in (self.vision_layers, self.injection_layers, self.hidden_size)

    def resolve(
        self, *, num_vision_hidden_states: int, main_vision_layer: int, num_decoder_layers: int, hidden_size: int
    ) -> ManagerConfig:
        """A copy with the model-dependent defaults filled in and every index checked against the model."""
        main = main_vision_layer % num_vision_hidden_states
        vision_layers = self.vision_layers or list(range(main // 2, main))
        injection_layers = self.injection_layers or list(range(0, num_decoder_layers, self.injection_interval))
        for layer in vision_layers:
            if layer >= num_vision_hidden_states:
                raise ValueError(
                    f"vision layer {layer} out of range: the tower has {num_vision_hidden_states} hidden states "
                    f"(0..{num_vision_hidden_states - 1})"
                )
        for layer in injection_layers:
            if layer >= num_decoder_layers:
                raise ValueError(
                    f"injection layer {layer} out of range: the language model has {num_decoder_layers} decoder "
                    f"layers (0..{num_decoder_layers - 1})"
                )
        if self.hidden_size is not None and self.hidden_size != hidden_size:
            raise ValueError(
                f"manager hidden_size {self.hidden_size} does not match the model: its language model has hidden "
                f"size {hidden_size}"
            )
        return replace(self, vision_layers=vision_layers, injection_layers=injection_layers, hidden_size=hidden_size)

    def num_experts(self, injection_layer: int) -> int:
        """How many vision layers the manager at `injection_layer` aggregates (one fewer at decoder layer 0)."""
        if self.vision_layers is None:
            raise ValueError("vision_layers is unresolved: call resolve() first")
        return len(self.vision_layers) - (1 if injection_layer == 0 else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManagerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ManagerConfig fields {unknown}: expected a subset of {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(self.to_json_string())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ManagerConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no manager config at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise TypeError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)
