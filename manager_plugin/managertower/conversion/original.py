"""The authors' Lightning checkpoints: their tensors, their sacred config, and the names of the original layout."""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...io import ConversionError

# Which head a checkpoint trained on each of the original loss names needs (`irtr`, ViLT's rank_output, has none).
TASK_HEAD_OF_LOSS = {
    "mlm": "pretrain",
    "itm": "pretrain",
    "itc": "pretrain",
    "itm_itc": "pretrain",
    "irtr_itm_itc": "retrieval",
    "vqa": "vqav2",
    "snli": "snli_ve",
    "nlvr2": "nlvr2",
    "irtr": None,
}
# The authors' `src/config.py` defaults, for the fields a hand-written config may leave out.
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "mlp_ratio": 4,
    "drop_rate": 0.1,
    "task_threshold": 0,
    "task_head_layers": 2,
    "head_hidden_scale": 1,
    "vqav2_label_size": 3129,
    "nlvr2_drop_rate": 0.1,
    "temperature": 0.07,
    "contrastive_hidden_size": 256,
    "vit_layernorm_shared": True,
    "vit_remove_last": False,
    "manager_weight_type": "vector",
    "manager_softmax_temperature": 1,
    "val_transform_keys": ["clip"],
}
REQUIRED_FIELDS = (
    "model_type",
    "vit",
    "tokenizer",
    "hidden_size",
    "num_heads",
    "num_layers",
    "image_size",
    "loss_names",
)
MANAGER_FIELDS = ("manager_type", "managed_layers_text", "managed_layers_image")

TEXT = "text_transformer."
VISION = "vit_model.visual."
BLOCK = VISION + r"transformer.resblocks.\1."


@dataclass(frozen=True)
class OriginalConfig:
    """The fields of the authors' sacred config that shape the model, validated."""

    model_type: str
    hidden_size: int
    num_heads: int
    num_layers: int
    mlp_ratio: int
    drop_rate: float
    image_size: int
    patch_size: int | None
    tasks: tuple[str, ...]
    head_hidden_scale: int
    vqav2_label_size: int
    nlvr2_drop_rate: float
    temperature: float
    contrastive_hidden_size: int
    manager_type: str | None
    managed_layers: int | None
    manager_weight_type: str
    manager_softmax_temperature: float
    eval_transform: str

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> OriginalConfig:
        """Read and check the sacred config (the checkpoint's `hyper_parameters["config"]`)."""
        values = {**ORIGINAL_DEFAULTS, **hparams}
        absent = [name for name in REQUIRED_FIELDS if name not in values]
        if absent:
            raise ConversionError(f"the checkpoint's hyper-parameters lack {absent}: expected the authors' config")
        model_type = values["model_type"]
        if model_type not in ("MT", "BT"):
            raise ConversionError(
                f"model_type {model_type!r} cannot be converted: expected 'MT' (ManagerTower) or 'BT' (BridgeTower)"
            )
        if "CLIP" not in str(values["vit"]):
            raise ConversionError(
                f"vision encoder vit={values['vit']!r}: only CLIP ViTs convert (e.g. 'CLIP-ViT-B/16')"
            )
        if "roberta" not in str(values["tokenizer"]):
            raise ConversionError(
                f"text encoder tokenizer={values['tokenizer']!r}: only RoBERTa text encoders convert (ManagerTower's "
                "text model is RobertaModel)"
            )
        unsupported = {
            "vit_layernorm_shared": (values["vit_layernorm_shared"], True),
            "vit_remove_last": (values["vit_remove_last"], False),
            "task_head_layers": (values["task_head_layers"], 2),
        }
        for name, (value, expected) in unsupported.items():
            if value != expected:
                raise ConversionError(f"{name}={value!r} has no ManagerTower equivalent (expected {expected!r})")
        manager_type = managed = None
        if model_type == "MT":
            absent = [name for name in MANAGER_FIELDS if name not in values]
            if absent:
                raise ConversionError(f"a ManagerTower (model_type 'MT') config needs {absent}")
            manager_type = values["manager_type"]
            if manager_type not in ("SAUE", "AAUE"):
                raise ConversionError(f"unknown manager_type {manager_type!r}: expected 'SAUE' or 'AAUE'")
            managed = values["managed_layers_text"]
            if values["managed_layers_image"] != managed:
                raise ConversionError(
                    f"managed_layers_text {managed} differs from managed_layers_image "
                    f"{values['managed_layers_image']}: ManagerTowerConfig has one num_managed_layers"
                )
            if values["manager_weight_type"] not in ("scalar", "vector"):
                raise ConversionError(
                    f"unknown manager_weight_type {values['manager_weight_type']!r}: expected 'scalar' or 'vector'"
                )
        return cls(
            model_type=model_type,
            hidden_size=values["hidden_size"],
            num_heads=values["num_heads"],
            num_layers=values["num_layers"],
            mlp_ratio=values["mlp_ratio"],
            drop_rate=values["drop_rate"],
            image_size=values["image_size"],
            patch_size=values.get("patch_size"),
            tasks=_active_tasks(values["loss_names"], values["task_threshold"]),
            head_hidden_scale=values["head_hidden_scale"],
            vqav2_label_size=values["vqav2_label_size"],
            nlvr2_drop_rate=values["nlvr2_drop_rate"],
            temperature=values["temperature"],
            contrastive_hidden_size=values["contrastive_hidden_size"],
            manager_type=manager_type,
            managed_layers=managed,
            manager_weight_type=values["manager_weight_type"],
            manager_softmax_temperature=values["manager_softmax_temperature"],
            eval_transform=_eval_transform(values["val_transform_keys"]),
        )

    @property
    def num_managed_layers(self) -> int:
        """How many top uni-modal layers the cross-modal layers see (BridgeTower: one per cross-modal layer)."""
        return self.managed_layers if self.model_type == "MT" else self.num_layers

    def auto_head(self) -> str:
        """The task head of the tasks the checkpoint was trained on (`base` when there are none)."""
        heads = {TASK_HEAD_OF_LOSS[task] for task in self.tasks}
        if None in heads:
            raise ConversionError(
                "the checkpoint was trained with the ViLT-style 'irtr' objective (rank_output), which has no "
                "ManagerTower head: pass --head base (or another head whose tensors it holds)"
            )
        if len(heads) > 1:
            raise ConversionError(
                f"the checkpoint was trained on several tasks {list(self.tasks)} needing heads {sorted(heads)}: "
                "choose one with --head"
            )
        return heads.pop() if heads else "base"


def _eval_transform(keys: Any) -> str:
    """The image transform the checkpoint is evaluated with (`val_transform_keys[0]`), for its processor."""
    from ..processing_managertower import EVAL_TRANSFORMS

    key = keys[0] if isinstance(keys, (list, tuple)) and keys else keys
    if key not in EVAL_TRANSFORMS:
        raise ConversionError(
            f"val_transform_keys {keys!r}: no ManagerTowerProcessor equivalent (expected ['clip'] or ['albef']); "
            "pass --hparams with the transform the model should be used with"
        )
    return key


def _active_tasks(loss_names: Any, threshold: float) -> tuple[str, ...]:
    if not isinstance(loss_names, Mapping):
        raise ConversionError(f"loss_names must map task names to weights, got {type(loss_names).__name__}")
    unknown = sorted(set(loss_names) - set(TASK_HEAD_OF_LOSS))
    if unknown:
        raise ConversionError(f"unknown loss names {unknown}: expected some of {sorted(TASK_HEAD_OF_LOSS)}")
    return tuple(sorted(name for name, weight in loss_names.items() if weight > threshold))


def load_lightning_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Mapping[str, Any] | None]:
    """The state dict and the sacred config of a Lightning `.ckpt`, unpickled with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"no checkpoint file at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(
            f"{path} is a pickle that would need arbitrary code to load ({reason}); refusing it. Only checkpoints of "
            "tensors and plain containers load with weights_only=True: where you trust its code, re-save it as one"
        ) from error
    except Exception as error:  # a damaged or foreign file fails anywhere inside the unpickler
        raise ConversionError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise ConversionError(f"{path} has no 'state_dict': expected a Lightning checkpoint saved by the authors' code")
    tensors = data["state_dict"]
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in tensors.items()):
        raise ConversionError(f"{path}: 'state_dict' must map names to tensors")
    hparams = data.get("hyper_parameters")
    return tensors, sacred_config(hparams) if isinstance(hparams, Mapping) else None


def sacred_config(hparams: Mapping[str, Any]) -> Mapping[str, Any]:
    # `save_hyperparameters()` in `__init__(self, config)` stores the sacred config under "config".
    config = hparams.get("config")
    return config if isinstance(config, Mapping) else hparams


def read_hparams(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"cannot read hyper-parameters from {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object (the authors' config), got {type(data).__name__}")
    return data
