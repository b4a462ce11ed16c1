"""A stage's arguments: the recipe, paths and stage options (`StageArguments`) plus HF `TrainingArguments`.

Precedence, lowest first: `TrainingArguments` defaults, the recipe's `training:` block, explicit values (command line
or keyword arguments). Derived values, unless given explicitly: gradient accumulation from the recipe's global batch
(`global_batch / (per_device_batch * world_size)`), the recipe's bf16 only where the hardware has it (an explicit
`--bf16 true` means bf16 on CPU too), reporting to tensorboard
(and wandb when `WANDB_PROJECT` is set) only when installed, no data-loader worker processes on a CPU-only machine.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from transformers import TrainingArguments

from .ds_config import configure_cpu_deepspeed_state, resolve_deepspeed, skip_cpu_inference_comm_op
from .paths import check_paths
from .recipe import Recipe, load_recipe

logger = logging.getLogger(__name__)


@dataclass
class StageArguments:
    """What a stage trains on and how, beyond `TrainingArguments`."""

    recipe: str = field(metadata={"help": "a recipe name (listed below) or a recipe YAML file"})
    model_name_or_path: str = field(
        metadata={"help": "the model to start from: a LLaVA-OneVision HF directory, or the previous stage's output_dir"}
    )
    data_path: str = field(
        metadata={"help": "LLaVA .json / .jsonl records or a mixture .yaml (several: comma-separated)"}
    )
    image_folder: str | None = field(default=None, metadata={"help": "the folder image paths are relative to"})
    global_batch_size: int | None = field(default=None, metadata={"help": "samples per optimizer step (recipe: 512)"})
    model_max_length: int | None = field(default=None, metadata={"help": "longest sample in tokens (recipe default)"})
    vision_tower_lr: float | None = field(
        default=None, metadata={"help": "vision tower learning rate (recipe default)"}
    )
    projector_lr: float | None = field(default=None, metadata={"help": "projector learning rate (recipe default)"})
    manager_lr: float | None = field(default=None, metadata={"help": "manager learning rate (recipe default)"})
    language_model_lr: float | None = field(default=None, metadata={"help": "language model learning rate"})
    manager_type: str | None = field(default=None, metadata={"help": "a new manager's type (recipe: static)"})
    manager_grid_type: str | None = field(default=None, metadata={"help": "a new manager's grid_type (all/main/grid)"})
    manager_jitter: float | None = field(default=None, metadata={"help": "a new manager's multiplicative jitter"})
    manager_modalities: str | None = field(
        default=None, metadata={"help": "whose tokens a new manager serves: images, videos or both (recipe: both)"}
    )
    group_by_modality_length: bool | None = field(
        default=None, metadata={"help": "batch by modality and length (recipe default); false: seeded random order"}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the language model's linear layers (0: no LoRA)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    on_bad_data: Literal["stop", "skip"] = field(
        default="stop",
        metadata={
            "help": "bad records (found before training, or failing to decode in it): stop, or skip and list them"
        },
    )
    image_check: Literal["verify", "decode"] = field(
        default="verify", metadata={"help": "how images are checked before training: header + integrity, or decode"}
    )
    validation_cache: str | None = field(
        default=None,
        metadata={"help": "where the validation pass is cached (default ~/.cache/llava_manager/validation; none: off)"},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "train into an output_dir that holds a finished stage, replacing it"}
    )
    keep_last_checkpoint: bool = field(
        default=False, metadata={"help": "keep the last checkpoint-N (optimizer states) once the stage has finished"}
    )

    @property
    def part_learning_rates(self) -> dict[str, float]:
        rates = {
            "vision_tower": self.vision_tower_lr,
            "projector": self.projector_lr,
            "manager": self.manager_lr,
            "language_model": self.language_model_lr,
        }
        return {part: rate for part, rate in rates.items() if rate is not None}

    @property
    def manager_overrides(self) -> dict[str, Any]:
        values = {
            "manager_type": self.manager_type,
            "grid_type": self.manager_grid_type,
            "jitter": self.manager_jitter,
            "modalities": self.manager_modalities,
        }
        return {key: value for key, value in values.items() if value is not None}


@dataclass
class StageSetup:
    """A resolved stage: the recipe, the stage arguments and the training arguments."""

    recipe: Recipe
    stage: StageArguments
    training: TrainingArguments

    @property
    def model_max_length(self) -> int:
        return self.stage.model_max_length or self.recipe.model_max_length

    @property
    def group_by_modality_length(self) -> bool:
        chosen = self.stage.group_by_modality_length
        return self.recipe.group_by_modality_length if chosen is None else chosen


STAGE_FIELDS = {f.name for f in fields(StageArguments)}
TRAINING_FIELDS = {f.name for f in fields(TrainingArguments) if f.init}


def _default_report_to() -> list[str]:
    targets = []
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        targets.append("tensorboard")
    if importlib.util.find_spec("wandb") and os.environ.get("WANDB_PROJECT"):
        targets.append("wandb")
    return targets or ["none"]


# Deprecated `TrainingArguments` names and their current ones. HF uses an old name only when the new one is unset, so
# an explicit `--gradient_checkpointing false` over a recipe's `activation_checkpointing: true` would be ignored.
RENAMED_OPTIONS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _current_names(options: dict[str, Any]) -> dict[str, Any]:
    return {RENAMED_OPTIONS.get(key, key): value for key, value in options.items()}


def _training_kwargs(recipe: Recipe, stage: StageArguments, explicit: dict[str, Any]) -> dict[str, Any]:
    """`TrainingArguments` keywords: the recipe's, the explicit ones, and the derived ones (module docstring)."""
    explicit = _current_names(explicit)
    kwargs = {**_current_names(recipe.training), **explicit}
    cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "bf16" not in explicit:
        kwargs["bf16"] = bool(kwargs.get("bf16")) and cuda and torch.cuda.is_bf16_supported()
    elif kwargs["bf16"] and not cuda and "use_cpu" not in explicit:
        # An explicit --bf16 true means bf16 on CPU too: HF allows it there only with use_cpu.
        kwargs["use_cpu"] = True
    if explicit.get("remove_unused_columns"):
        raise ValueError("remove_unused_columns must stay False: the collator reads the raw samples")
    kwargs["remove_unused_columns"] = False
    if "dataloader_num_workers" not in explicit and not cuda:
        kwargs["dataloader_num_workers"] = 0  # a CPU run is a smoke test: worker processes only compete for the cores
    if "dataloader_pin_memory" not in explicit and not cuda:
        kwargs["dataloader_pin_memory"] = False  # pinned memory only speeds up copies to a GPU
    if "report_to" not in explicit:
        kwargs["report_to"] = _default_report_to()
    if kwargs.get("activation_checkpointing") and "activation_checkpointing_kwargs" not in explicit:
        # Non-reentrant checkpointing also gives gradients to LoRA / projector inputs when the embeddings are frozen.
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}

    kwargs["deepspeed"] = resolve_deepspeed(kwargs.get("deepspeed"))
    if kwargs["deepspeed"] is not None:
        skip_cpu_inference_comm_op()
        if configure_cpu_deepspeed_state(int(kwargs.get("ddp_timeout", 1800))):
            kwargs["accelerator_config"] = {**(kwargs.get("accelerator_config") or {}), "use_configured_state": True}
    elif not cuda and world_size > 1 and "use_cpu" not in explicit:
        kwargs["use_cpu"] = True  # accelerate starts a gloo process group across CPU processes only when told so

    global_batch = stage.global_batch_size or recipe.global_batch_size
    per_device = int(kwargs.get("per_device_train_batch_size", 8))
    if "gradient_accumulation_steps" not in explicit:
        if global_batch % (per_device * world_size):
            raise ValueError(
                f"global batch {global_batch} is not a multiple of per_device_train_batch_size {per_device} x "
                f"{world_size} process(es): change --global_batch_size or --per_device_train_batch_size"
            )
        kwargs["gradient_accumulation_steps"] = global_batch // (per_device * world_size)
    return kwargs


def check_stage(stage: StageArguments, recipe: Recipe, explicit: dict[str, Any]) -> None:
    """Every stage option that can be judged without the model or the data, so a mistake stops the run at once."""
    from manager_plugin import ManagerConfig

    check_paths(stage.model_name_or_path, stage.data_path, stage.image_folder)
    overrides = stage.manager_overrides
    if recipe.manager is None and overrides:
        raise ValueError(f"manager options {sorted(overrides)} were given but recipe {recipe.name} has no manager")
    if recipe.manager is not None:
        ManagerConfig.from_dict({**recipe.manager, **overrides})  # raises on an unknown type, grid type or jitter
    if stage.lora_r < 0:
        raise ValueError(f"--lora_r {stage.lora_r}: expected 0 (no LoRA) or a positive rank")
    if stage.lora_r and "language_model" not in recipe.trainable:
        raise ValueError(
            f"--lora_r {stage.lora_r}: LoRA adapts the language model, but recipe {recipe.name} does not train it"
        )
    resolve_deepspeed({**recipe.training, **explicit}.get("deepspeed"))  # raises on an unknown name or missing file


def resolve_stage(values: dict[str, Any]) -> StageSetup:
    """Build a `StageSetup` from explicitly given values (the recipe fills in everything else)."""
    unknown = sorted(set(values) - STAGE_FIELDS - TRAINING_FIELDS)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}: expected StageArguments or TrainingArguments fields")
    missing = sorted({"recipe", "model_name_or_path", "data_path", "output_dir"} - set(values))
    if missing:
        raise ValueError(f"missing required arguments {missing}")
    stage = StageArguments(**{key: value for key, value in values.items() if key in STAGE_FIELDS})
    recipe = load_recipe(stage.recipe)
    explicit = {key: value for key, value in values.items() if key in TRAINING_FIELDS}
    check_stage(stage, recipe, explicit)
    training = TrainingArguments(**_training_kwargs(recipe, stage, explicit))
    # Starting the devices now starts the process group, so the validation pass can share its work across ranks.
    logger.info("training on %s, %d process(es)", training.device, training.world_size)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if training.world_size != expected:
        raise RuntimeError(f"WORLD_SIZE says {expected} processes but the process group holds {training.world_size}")
    return StageSetup(recipe, stage, training)
