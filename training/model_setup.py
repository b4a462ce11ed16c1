"""The model of a stage: loaded with its manager, images set up as the recipe says, parts frozen or trained, LoRA.

A stage's model is the previous stage's output (a merged checkpoint): `load_model` restores its manager, which is
carried through; a manager recipe starting from a model without one applies a fresh, zero-initialised manager.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from llava_integration import apply_manager, load_model, manager_of, set_image_aspect_ratio
from llava_integration.families import family_named
from llava_integration.processing import use_image_mode
from manager_plugin import ManagerConfig

from .optim import GroupRule
from .recipe import PART_NAMES, Recipe

logger = logging.getLogger(__name__)

# Name patterns of each trainable part; the language model is every other parameter (decoder, embeddings, head).
# `image_newline` is the connector's learned row separator, so it trains with the projector.
PARTS: dict[str, tuple[str, ...]] = {
    "manager": ("manager",),
    "vision_tower": ("vision_tower",),
    "projector": ("multi_modal_projector", "image_newline"),
    "language_model": (),
}
# LoRA goes on the language model's linear layers only: never the vision tower, projector or manager.
LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def part_rules(recipe: Recipe, base_lr: float, part_lrs: dict[str, float] | None = None) -> list[GroupRule]:
    """Optimizer group rules of the four parts, with learning rates relative to `base_lr`."""
    rates = {part: recipe.learning_rates.get(part, base_lr) for part in PART_NAMES}
    rates.update(part_lrs or {})
    return [GroupRule(part, PARTS[part], rates[part] / base_lr) for part in PART_NAMES]


def part_of(parameter_name: str) -> str:
    """Which part a parameter belongs to."""
    for part, patterns in PARTS.items():
        if patterns and any(pattern in parameter_name for pattern in patterns):
            return part
    return "language_model"


def stage_image_mode(model_type: str, recipe: Recipe) -> str | None:
    """The image mode a stage trains in: the recipe's on LLaVA-OneVision; None (the checkpoint's own) on LLaVA-1.5
    and NeXT, whose images have one mode (the recipes are OneVision's)."""
    if family_named(model_type).square_images:
        return recipe.image_aspect_ratio
    logger.info("%s reads images its own way: the recipe's image settings apply to LLaVA-OneVision only", model_type)
    return None


def configure_processor(processor, recipe: Recipe, image_mode: str | None) -> None:
    """Right padding; in an AnyRes `image_mode`, the recipe's pinpoints (in multiples of the crop size)."""
    processor.tokenizer.padding_side = "right"
    if image_mode is None:
        return
    size = processor.image_processor.size
    if size["height"] != size["width"]:
        raise ValueError(f"the image processor crops {size}: expected square crops of the vision tower's input size")
    pinpoints = recipe.grid_pinpoints(size["height"])
    if pinpoints is not None:
        processor.image_processor.image_grid_pinpoints = pinpoints
    use_image_mode(processor, image_mode)


def configure_images(model: nn.Module, recipe: Recipe) -> None:
    """Square images, or AnyRes with the recipe's pinpoints, in multiples of the vision tower's input size; nothing
    for the families with one image mode."""
    if stage_image_mode(model.config.model_type, recipe) is None:
        return
    if recipe.image_aspect_ratio == "square":
        set_image_aspect_ratio(model, "square")
        return
    model.config.image_grid_pinpoints = recipe.grid_pinpoints(model.config.vision_config.image_size)
    set_image_aspect_ratio(model, recipe.image_aspect_ratio)


def ensure_manager(
    model: nn.Module, recipe: Recipe, source: str, overrides: dict[str, Any] | None = None, seed: int = 0
) -> None:
    """Keep the manager the checkpoint carries, or apply the recipe's; a baseline recipe refuses a manager model.

    A new manager is initialised from `seed` alone, whatever the loading path consumed of the RNG before: every rank
    then builds the same weights, which ZeRO-3 partitions from each rank's own copy.
    """
    overrides = overrides or {}
    existing = manager_of(model)
    if recipe.manager is None:
        if existing is not None:
            raise ValueError(
                f"recipe {recipe.name} trains the baseline (no manager) but {source} holds a manager "
                f"({existing.config.manager_type}): start from a baseline checkpoint or use a manager recipe"
            )
        if overrides:
            raise ValueError(f"manager options {sorted(overrides)} were given but recipe {recipe.name} has no manager")
        return
    if existing is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            apply_manager(model, ManagerConfig.from_dict({**recipe.manager, **overrides}))
        logger.info("applied a new manager: %s", manager_of(model).config)
        return
    conflicts = {key: value for key, value in overrides.items() if getattr(existing.config, key) != value}
    if conflicts:
        raise ValueError(
            f"{source} carries a manager {existing.config}, which the options {conflicts} contradict: a carried "
            "manager keeps its configuration"
        )
    logger.info("carrying the manager of %s through: %s", source, existing.config)


def set_trainable(model: nn.Module, parts: tuple[str, ...]) -> dict[str, int]:
    """Train exactly the parameters of `parts`; return the trainable parameter count per part."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}: expected a subset of {list(PARTS)}")
    counts = dict.fromkeys(parts, 0)
    for name, parameter in model.named_parameters():
        part = part_of(name)
        parameter.requires_grad_(part in parts)
        if part in parts:
            counts[part] += parameter.numel()
    return counts


def apply_lora(model: nn.Module, parts: tuple[str, ...], r: int, alpha: int, dropout: float) -> nn.Module:
    """LoRA (PEFT) on the language model's linear layers; the other `parts` train in full, the base LLM stays frozen."""
    from peft import LoraConfig, get_peft_model

    if "language_model" not in parts:
        raise ValueError(f"LoRA adapts the language model, but the recipe does not train it (trainable: {list(parts)})")
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS)
    )
    for name, parameter in peft_model.named_parameters():
        if "lora_" not in name:
            parameter.requires_grad_(part_of(name) in parts and part_of(name) != "language_model")
    return peft_model


def load_stage_model(
    path: str,
    recipe: Recipe,
    *,
    manager_overrides: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    """The model a stage trains: loaded (fp32 master weights), images configured, manager ensured, parts set."""
    model = load_model(path, dtype=torch.float32)
    configure_images(model, recipe)
    ensure_manager(model, recipe, path, manager_overrides, seed)
    counts = set_trainable(model, recipe.trainable)
    if lora and lora.get("r"):
        model = apply_lora(model, recipe.trainable, lora["r"], lora.get("alpha", 16), lora.get("dropout", 0.05))
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    logger.info(
        "trainable parameters: %d of %d (%s)%s", trainable, total, counts, " + LoRA" if lora and lora.get("r") else ""
    )
    return model
