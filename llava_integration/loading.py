"""Loading checkpoints with their managers restored: merged checkpoints and base model + adapter."""

from __future__ import annotations

from pathlib import Path

from transformers import LlavaOnevisionForConditionalGeneration

from manager_plugin import ManagerConfig

from .adapter import load_manager
from .features import SQUARE
from .patch import CONFIG_ATTRIBUTE, apply_manager, set_image_aspect_ratio


def restore_from_config(model: LlavaOnevisionForConditionalGeneration) -> None:
    """Re-install what a saved config records: square images, and the manager of a merged checkpoint."""
    if model.config.vision_aspect_ratio == SQUARE:
        set_image_aspect_ratio(model, SQUARE)
    recorded = getattr(model.config, CONFIG_ATTRIBUTE, None)
    if recorded:
        apply_manager(model, ManagerConfig.from_dict(dict(recorded)))


class LlavaOnevisionManagerForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """HF's LLaVA-OneVision, plus whatever its config records of the manager. Adds no modeling code.

    `save_pretrained` of a patched model writes a merged checkpoint (the manager's weights under `model.manager.*`,
    its config under `manager_config` in config.json); `from_pretrained` of this class reads it back whole. The
    plain HF class loads the same directory as the base model, ignoring the manager's weights.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        restore_from_config(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """HF's `from_pretrained`, refusing a checkpoint whose config records a manager that its weights lack."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        # HF leaves missing parameters of modules it does not know as uninitialised memory: never train on that.
        missing = sorted(key for key in info["missing_keys"] if ".manager." in f".{key}")  # `apply_manager`'s module
        if missing:
            raise ValueError(
                f"{pretrained_model_name_or_path}: config.json records a manager "
                f"but the weights lack {len(missing)} of its tensors ({', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}): the checkpoint is incomplete; re-save it from the trained "
                "model, or load the base model with the plain HF class and apply the manager adapter"
            )
        return (model, info) if wants_info else model


def load_model(
    path: str | Path, manager: str | Path | None = None, **from_pretrained_kwargs
) -> LlavaOnevisionForConditionalGeneration:
    """Load a (merged) checkpoint with its manager, and optionally apply a manager adapter from `manager`."""
    model = LlavaOnevisionManagerForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs)
    if manager is not None:
        load_manager(model, manager)
    return model
