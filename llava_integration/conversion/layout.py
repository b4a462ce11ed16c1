"""Tensor names and shapes: LLaVA-NeXT's checkpoint layout <-> HF LLaVA-OneVision's modules and our manager adapter.

One table of (LLaVA-NeXT prefix, HF prefix) pairs serves both directions. The HF prefixes are read off the model
instance, so the table follows the module layout of the installed transformers version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from manager_plugin import ManagerConfig
from manager_plugin.io import ConversionError

ORIGINAL_VISION = "model.vision_tower.vision_tower.vision_model."
ORIGINAL_VISION_BLOCKS = ORIGINAL_VISION + "encoder.layers."
ORIGINAL_EMBED = "model.embed_tokens.weight"
ORIGINAL_LM_HEAD = "lm_head.weight"
ORIGINAL_NEWLINE = "model.image_newline"
ORIGINAL_MANAGER = "model.manager."
ORIGINAL_LAYER_EMBEDDING = "model.manager_layer_embedding"
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed by the model


@dataclass(frozen=True)
class Layout:
    """Renames LLaVA-NeXT tensors to the tensors of one HF `LlavaOnevisionForConditionalGeneration`, and back."""

    pairs: tuple[tuple[str, str], ...]  # a prefix that does not end in "." names a single tensor

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        names = {id(module): name for name, module in model.named_modules()}
        inner = model.model
        vision = names[id(inner.vision_tower)] + "."
        if hasattr(inner.vision_tower, "vision_model"):  # transformers versions that keep the SigLIP wrapper
            vision += "vision_model."
        text = names[id(inner.language_model)] + "."
        projector = names[id(inner.multi_modal_projector)] + "."
        return cls(
            pairs=(
                (ORIGINAL_VISION, vision),
                ("model.mm_projector.0.", projector + "linear_1."),
                ("model.mm_projector.2.", projector + "linear_2."),
                (ORIGINAL_NEWLINE, names[id(inner)] + ".image_newline"),
                ("model.embed_tokens.", text + "embed_tokens."),
                ("model.layers.", text + "layers."),
                ("model.norm.", text + "norm."),
                ("lm_head.", names[id(model.lm_head)] + "."),
            )
        )

    @staticmethod
    def _rename(name: str, pairs) -> str | None:
        for source, target in pairs:
            if name == source or (source.endswith(".") and name.startswith(source)):
                return target + name[len(source) :]
        return None

    def to_hf(self, key: str) -> str | None:
        return self._rename(key, self.pairs)

    def to_original(self, name: str) -> str | None:
        return self._rename(name, tuple((hf, original) for original, hf in self.pairs))


def count_vision_blocks(tensors: dict[str, torch.Tensor]) -> int:
    """How many SigLIP encoder blocks the checkpoint holds (0..K-1 must all be there)."""
    indices = {
        int(key[len(ORIGINAL_VISION_BLOCKS) :].split(".")[0])
        for key in tensors
        if key.startswith(ORIGINAL_VISION_BLOCKS)
    }
    if not indices:
        raise ConversionError(
            f"missing tensor: the checkpoint has no vision encoder blocks ({ORIGINAL_VISION_BLOCKS}*)"
        )
    absent = sorted(set(range(max(indices) + 1)) - indices)
    if absent:
        raise ConversionError(f"missing tensors: vision encoder blocks {absent} ({ORIGINAL_VISION_BLOCKS}<i>.*)")
    return max(indices) + 1


def rename_to_hf(
    tensors: dict[str, torch.Tensor], layout: Layout, expected: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """`tensors` under their HF names, checked to be exactly the `expected` names and shapes."""
    renamed, unexpected = {}, []
    for key, tensor in tensors.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        name = layout.to_hf(key)
        if name not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ConversionError(
                f"tensor {key} has shape {tuple(tensor.shape)}, but the model that config.json describes needs "
                f"{tuple(expected[name])}"
            )
        renamed[name] = tensor
    missing = [layout.to_original(name) or name for name in expected if name not in renamed]
    if missing:
        raise ConversionError(f"missing tensor{'s' if len(missing) > 1 else ''} in the checkpoint: {missing[:8]}")
    if unexpected:
        raise ConversionError(f"unexpected tensors for a LLaVA-OneVision checkpoint: {sorted(unexpected)[:8]}")
    return renamed


def rename_to_original(tensors: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """HF tensors under their LLaVA-NeXT names."""
    renamed = {}
    for name, tensor in tensors.items():
        key = layout.to_original(name)
        if key is None:
            raise ConversionError(f"tensor {name} has no place in a LLaVA-NeXT checkpoint")
        renamed[key] = tensor
    return renamed


# -- the manager ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManagerTensor:
    original: str
    adapter: str  # name inside `LayerManagers`, as in manager.safetensors
    original_shape: tuple[int, ...]
    adapter_shape: tuple[int, ...]


def manager_tensors(config: ManagerConfig) -> list[ManagerTensor]:
    """Every manager tensor of a resolved config under both names, with the shape each layout stores it in.

    LLaVA-NeXT keeps per-layer vectors as (1, N, 1, D); the adapter keeps them as (N, D). The manager at decoder
    layer 0 is static with N - 1 layers in both.
    """
    hidden, layers = config.hidden_size, len(config.vision_layers)
    specs = [ManagerTensor(ORIGINAL_LAYER_EMBEDDING, "layer_embedding.weight", (layers, hidden), (layers, hidden))]
    for slot, layer in enumerate(config.injection_layers):
        original, adapter = f"{ORIGINAL_MANAGER}{slot}.", f"managers.{slot}."
        experts = config.num_experts(layer)
        if layer == 0 or config.manager_type == "static":
            specs.append(
                ManagerTensor(
                    original + "layer_scores", adapter + "layer_weights", (1, experts, 1, hidden), (experts, hidden)
                )
            )
            continue
        controller_in = hidden if config.manager_type == "adaptive" else 2 * hidden
        specs += [
            ManagerTensor(
                original + "linear_controller.weight",
                adapter + "controller.weight",
                (experts, controller_in),
                (experts, controller_in),
            ),
            ManagerTensor(original + "zero_gate", adapter + "gate", (1, experts, 1, hidden), (experts, hidden)),
        ]
        if config.manager_type == "adaptive_cross":
            for projection in ("q_proj", "k_proj"):
                source, target = f"{original}fusion_attention.{projection}.", f"{adapter}query_attention.{projection}."
                specs += [
                    ManagerTensor(source + "weight", target + "weight", (hidden, hidden), (hidden, hidden)),
                    ManagerTensor(source + "bias", target + "bias", (hidden,), (hidden,)),
                ]
    return specs


def is_manager_tensor(key: str) -> bool:
    return key.startswith(ORIGINAL_MANAGER) or key == ORIGINAL_LAYER_EMBEDDING


def manager_to_adapter(tensors: dict[str, torch.Tensor], config: ManagerConfig) -> dict[str, torch.Tensor]:
    """LLaVA-NeXT's manager tensors as the adapter's state dict, checked against the config's names and shapes."""
    specs = manager_tensors(config)
    missing = [spec.original for spec in specs if spec.original not in tensors]
    if missing:
        raise ConversionError(
            f"missing manager tensor{'s' if len(missing) > 1 else ''} in the checkpoint: {missing[:8]}"
        )
    unexpected = sorted(set(tensors) - {spec.original for spec in specs})
    if unexpected:
        raise ConversionError(
            f"unexpected manager tensors for the mm_manager_* fields of config.json: {unexpected[:8]}"
        )
    adapter = {}
    for spec in specs:
        tensor = tensors[spec.original]
        if tuple(tensor.shape) != spec.original_shape:
            raise ConversionError(
                f"manager tensor {spec.original} has shape {tuple(tensor.shape)}, but the mm_manager_* fields of "
                f"config.json expect {spec.original_shape}"
            )
        adapter[spec.adapter] = tensor.reshape(spec.adapter_shape)
    return adapter


def adapter_to_manager(adapter: dict[str, torch.Tensor], config: ManagerConfig) -> dict[str, torch.Tensor]:
    """The adapter's state dict under LLaVA-NeXT's names and shapes."""
    specs = manager_tensors(config)
    unknown = sorted(set(adapter) - {spec.adapter for spec in specs})
    if unknown:
        raise ConversionError(f"manager tensors {unknown[:8]} have no LLaVA-NeXT counterpart")
    return {spec.original: adapter[spec.adapter].reshape(spec.original_shape) for spec in specs}
