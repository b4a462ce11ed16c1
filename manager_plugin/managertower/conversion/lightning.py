"""The authors' Lightning checkpoints of ManagerTower and BridgeTower -> HF-format ManagerTower (or HF BridgeTower).

The authors' code (`src/modules/mt_module.py`, `bt_module.py`) saves `{"state_dict": ..., "hyper_parameters":
{"config": <the sacred config>}}`. The target config is derived from those hyper-parameters and from tensor shapes;
then each tensor of the target model is pulled from the original state dict by the first rule whose pattern matches
its name. Every original tensor must be used, be a known leftover of the original code, belong to a head the chosen
class does not hold, or be a buffer its module fills itself (RoBERTa's position ids, which the transformers 4.17 the
authors pin saves; checked to hold those values); all but the used ones are reported, so nothing is dropped unnoticed.
Hyper-parameters are read as PyTorch-Lightning 1.5 stores them (`{"config": {...}}`). Everything is read and checked
before anything is written, and the destination appears only when complete.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    BaseImageProcessor,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerImageProcessor,
    BridgeTowerModel,
    BridgeTowerProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from ...io import ConversionError, check_destination, staged_directory
from ..heads import TASK_HEADS
from ..modeling_managertower import ManagerTowerModel
from ..processing_managertower import ManagerTowerProcessor, image_processor_for
from .original import OriginalConfig, load_lightning_checkpoint, read_hparams, sacred_config
from .rules import (
    HEAD_TENSORS,
    HF_BRIDGETOWER_RULES,
    LEFTOVERS,
    MANAGERTOWER_RULES,
    Getter,
    Plan,
    check_constant_buffers,
    resolve,
)
from .target import bridgetower_config, managertower_config

FORMATS = ("managertower", "hf-bridgetower")
HEADS = ("auto", "base", *TASK_HEADS)
HF_BRIDGETOWER_CLASSES: dict[str, type[PreTrainedModel]] = {
    "base": BridgeTowerModel,
    "pretrain": BridgeTowerForMaskedLM,
    "retrieval": BridgeTowerForImageAndTextRetrieval,
}


@dataclass(frozen=True)
class ConversionResult:
    """Where the model was written, its class, and the original tensors it does not carry (sorted)."""

    destination: Path
    architecture: str
    dropped: tuple[str, ...]


def _target(
    tensors: dict[str, torch.Tensor], original: OriginalConfig, head: str, output_format: str, image_size: int
) -> tuple[PreTrainedModel, tuple[tuple[str, Getter], ...], dict[str, torch.Size]]:
    """The (meta-device) model to fill, its rules, and every tensor to resolve (name without the base prefix)."""
    if output_format == "managertower":
        config = managertower_config(tensors, original, head, image_size)
        model_class = ManagerTowerModel if head == "base" else TASK_HEADS[head]
        rules = MANAGERTOWER_RULES
        extra_heads: tuple[type[PreTrainedModel], ...] = ()
    else:
        if original.model_type != "BT":
            raise ConversionError("--format hf-bridgetower takes BridgeTower checkpoints (model_type 'BT') only")
        if head not in HF_BRIDGETOWER_CLASSES:
            raise ConversionError(
                f"HF BridgeTower has no {head!r} head (it has {sorted(HF_BRIDGETOWER_CLASSES)}): convert to "
                "ManagerTower's bridge mode with --format managertower"
            )
        config = bridgetower_config(tensors, original, image_size)
        model_class = HF_BRIDGETOWER_CLASSES[head]
        rules = HF_BRIDGETOWER_RULES
        # As HF's own BridgeTower checkpoints: the pre-training directory also holds the ITM head (when trained), so
        # BridgeTowerForImageAndTextRetrieval loads from it too.
        extra_heads = (
            (BridgeTowerForImageAndTextRetrieval,) if head == "pretrain" and "itm_score.fc.weight" in tensors else ()
        )
    with torch.device("meta"):
        model = model_class(config)
        expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
        for extra in extra_heads:
            expected.update({n: t.shape for n, t in extra(config).state_dict().items() if n not in expected})
    return model, rules, expected


def convert_lightning_checkpoint(
    checkpoint: str | Path,
    destination: str | Path,
    *,
    head: str = "auto",
    output_format: str = "managertower",
    image_size: int | None = None,
    hparams: Mapping[str, Any] | str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> ConversionResult:
    """Convert an original ManagerTower / BridgeTower `.ckpt` into an HF directory (`save_pretrained` layout).

    `head`: a `TASK_HEADS` name, `base` (the bare model) or `auto` (from the checkpoint's loss names).
    `output_format`: `managertower` (BridgeTower becomes ManagerTower's `bridge` mode) or `hf-bridgetower`.
    `image_size`: the resolution to convert to (default: the checkpoint's); CLIP's positions are resized bicubically.
    `hparams`: the sacred config (a mapping or a JSON file), used instead of the checkpoint's `hyper_parameters`.
    `tokenizer`: a tokenizer (directory or hub name): the model is saved with its processor (tokenizer and image
    processor, as the checkpoint is evaluated: `val_transform_keys`); without one, with its image processor alone.
    """
    checkpoint, destination = Path(checkpoint), Path(destination)
    if head not in HEADS:
        raise ConversionError(f"unknown head {head!r}: expected one of {list(HEADS)}")
    if output_format not in FORMATS:
        raise ConversionError(f"unknown format {output_format!r}: expected one of {list(FORMATS)}")
    check_destination(destination)
    tensors, saved_hparams = load_lightning_checkpoint(checkpoint)
    if isinstance(hparams, (str, Path)):
        hparams = read_hparams(Path(hparams))
    hparams = sacred_config(hparams) if hparams is not None else saved_hparams
    if hparams is None:
        raise ConversionError(
            f"{checkpoint} has no hyper_parameters (the authors' sacred config): pass them with --hparams FILE.json"
        )
    original = OriginalConfig.from_hparams(hparams)
    head = original.auto_head() if head == "auto" else head
    model, rules, expected = _target(tensors, original, head, output_format, image_size or original.image_size)
    prefix = f"{model.base_model_prefix}."
    plan = Plan(original=original, expected={n.removeprefix(prefix): s for n, s in expected.items()})
    values, used = resolve(tensors, rules, plan)
    unused = sorted(set(tensors) - used)
    constant = set(check_constant_buffers(tensors))
    unexpected = [
        name for name in unused if not (name in constant or LEFTOVERS.match(name) or HEAD_TENSORS.match(name))
    ]
    if unexpected:
        raise ConversionError(
            f"unexpected tensors in {checkpoint.name} for a model_type {original.model_type!r} model with these "
            f"hyper-parameters ({len(unexpected)}): {unexpected[:10]}"
        )
    names = {name.removeprefix(prefix): name for name in expected}
    state = {names[name]: value for name, value in values.items()}
    own = model.state_dict().keys()  # the extra heads of `expected` are saved with it, not loaded into it
    model.load_state_dict({n: t for n, t in state.items() if n in own}, strict=True, assign=True)
    loaded_tokenizer = _load_tokenizer(tokenizer) if tokenizer is not None else None
    processor = _processor(output_format, image_size or original.image_size, original.eval_transform, loaded_tokenizer)
    with staged_directory(destination) as staging:
        model.save_pretrained(staging, state_dict=state)
        processor.save_pretrained(staging)
    return ConversionResult(destination=destination, architecture=type(model).__name__, dropped=tuple(unused))


def _processor(
    output_format: str, image_size: int, eval_transform: str, tokenizer: PreTrainedTokenizerBase | None
) -> ProcessorMixin | BaseImageProcessor:
    """What users call the model with: the processor (the image processor alone without a tokenizer)."""
    if output_format == "managertower":
        images: BaseImageProcessor = image_processor_for(image_size, eval_transform)
        return images if tokenizer is None else ManagerTowerProcessor(images, tokenizer)
    # HF BridgeTower's own processor, as its checkpoints ship it (its resize rounds sides to multiples of 32).
    images = BridgeTowerImageProcessor(size={"shortest_edge": image_size}, crop_size={"shortest_edge": image_size})
    return images if tokenizer is None else BridgeTowerProcessor(images, tokenizer)


def _load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot load the tokenizer {source}: {error}") from error
