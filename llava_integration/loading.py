"""Loading checkpoints with their managers restored: merged checkpoints and base model + adapter, for every family."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import AutoConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from manager_plugin import ManagerConfig

from .adapter import load_manager
from .families import FAMILIES, ModelFamily, family_named, family_of
from .image_modes import SQUARE
from .patch import CONFIG_ATTRIBUTE, apply_manager, set_image_aspect_ratio


def restore_from_config(model: nn.Module) -> None:
    """Re-install what a saved config records: square images, and the manager of a merged checkpoint."""
    family = family_of(model)[0]
    if family.square_images and model.config.vision_aspect_ratio == SQUARE:
        set_image_aspect_ratio(model, SQUARE)
    recorded = getattr(model.config, CONFIG_ATTRIBUTE, None)
    if recorded:
        apply_manager(model, ManagerConfig.from_dict(dict(recorded)))


def _manager_class(family: ModelFamily) -> type[nn.Module]:
    base = family.model_class
    name = base.__name__.replace("ForConditionalGeneration", "ManagerForConditionalGeneration")

    def __init__(self, config) -> None:
        base.__init__(self, config)
        restore_from_config(self)

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """HF's `from_pretrained`, refusing a checkpoint whose config records a manager that its weights lack."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = base.from_pretrained.__func__(
            cls, pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
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

    doc = (
        f"HF's `{base.__name__}`, plus whatever its config records of the manager. Adds no modeling code.\n\n"
        "`save_pretrained` of a patched model writes a merged checkpoint (the manager's weights under "
        "`model.manager.*`, its config under `manager_config` in config.json); `from_pretrained` of this class reads "
        "it back whole. The plain HF class loads the same directory as the base model, ignoring the manager."
    )
    mapping = get_checkpoint_conversion_mapping(base.__name__) or get_checkpoint_conversion_mapping(family.name)
    if mapping is not None:
        # HF renames checkpoint keys (e.g. LLaVA's lm_head) only for classes defined in transformers: a subclass
        # defined here must be given its family's renamings, or its own merged checkpoints reload without lm_head.
        register_checkpoint_conversion_mapping(name, mapping, overwrite=True)
    members = {"__init__": __init__, "from_pretrained": classmethod(from_pretrained), "__doc__": doc}
    return type(name, (base,), {**members, "__module__": __name__})


# One loading class per family, named after HF's (LlavaOnevisionManagerForConditionalGeneration, ...).
MANAGER_CLASSES: dict[str, type[nn.Module]] = {family.name: _manager_class(family) for family in FAMILIES}
LlavaManagerForConditionalGeneration = MANAGER_CLASSES["llava"]
LlavaNextManagerForConditionalGeneration = MANAGER_CLASSES["llava_next"]
LlavaNextVideoManagerForConditionalGeneration = MANAGER_CLASSES["llava_next_video"]
LlavaOnevisionManagerForConditionalGeneration = MANAGER_CLASSES["llava_onevision"]


def load_model(path: str | Path, manager: str | Path | None = None, **from_pretrained_kwargs) -> nn.Module:
    """Load a (merged) checkpoint of any supported family with its manager; optionally apply an adapter `manager`."""
    model_type = AutoConfig.from_pretrained(path).model_type
    model = MANAGER_CLASSES[family_named(model_type).name].from_pretrained(path, **from_pretrained_kwargs)
    if manager is not None:
        load_manager(model, manager)
    return model
