"""Analytic FLOPs of one LLaVA-family forward and training step, with and without the manager.

Convention (that of MFU and of `torch.utils.flop_counter`): a multiply-add is 2 FLOPs; every matmul, the patch
convolution and both attention products count, attention over the full `S x S` (as SDPA computes it, causal or
not); norms, activations, softmax, rotary and biases do not. The manager's own elementwise work (layer-embedding
add, weighted sums, the add into the stream) is counted separately, because it is part of its floor.

A training step (everything trainable) costs 3x the forward, except the patch convolution: its input is the pixels,
which need no gradient, so 2x; and the vision blocks above the highest layer read (LLaVA-1.5 and NeXT read the
second-to-last one), which run but receive no gradient, so 1x.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import PretrainedConfig

from manager_plugin import ManagerConfig


@dataclass(frozen=True)
class Workload:
    """What one batch asks of the model: crops through the tower and tokens through the language model."""

    batch_size: int
    seq_len: int  # padded length of every sample
    crops: int  # crops of all images of the batch (base views included)
    visual_tokens: int  # image placeholder tokens in the whole batch
    # Crop tokens the manager projects (grid_type "all"): those packing keeps, newline tokens not included; every
    # crop token when some image is downsampled (packing then mixes tokens after the projector). None: every one.
    manager_tokens: int | None = None

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def tower_positions(config: PretrainedConfig) -> int:
    """Positions the vision tower runs on per crop: its patches, and CLIP's class token."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + (1 if vision.model_type == "clip_vision_model" else 0)


def crop_tokens(config: PretrainedConfig) -> int:
    """Visual tokens one crop yields (the projector's rows per crop): `default` drops the tower's first position."""
    tokens = tower_positions(config)
    return tokens - 1 if config.vision_feature_select_strategy == "default" else tokens


def projector_flops_per_token(config: PretrainedConfig) -> int:
    """One pass of the 2-layer MLP projector over one token."""
    vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
    return 2 * (vision * text + text * text)


def forward_flops(
    config: PretrainedConfig, work: Workload, manager: ManagerConfig | None, logits_tokens: int
) -> dict[str, int]:
    """Forward FLOPs by component; `logits_tokens` is how many positions the LM head scores (all, or 1 per sample)."""
    vision, text = config.vision_config, config.text_config
    patches = (vision.image_size // vision.patch_size) ** 2
    positions = tower_positions(config)
    dv, iv = vision.hidden_size, vision.intermediate_size
    vision_layer = 8 * positions * dv * dv + 4 * positions * dv * iv + 4 * positions * positions * dv
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    d, s = text.hidden_size, work.seq_len
    q_width, kv_width = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    text_layer = (
        2 * s * d * q_width  # q
        + 4 * s * d * kv_width  # k, v
        + 2 * s * q_width * d  # o
        + 4 * s * s * q_width  # scores and weighted values
        + 6 * s * d * text.intermediate_size  # gate, up, down
    )
    projected_rows = work.crops * crop_tokens(config)
    # Hidden state h is the output of block h; a negative main feature layer counts from the last hidden state.
    main_layer = config.vision_feature_layer % (vision.num_hidden_layers + 1)
    highest_read = max([main_layer, *(manager.vision_layers if manager is not None else [])])
    flops = {
        "vision_patch_embedding": work.crops * 2 * patches * 3 * vision.patch_size**2 * dv,
        "vision_blocks": work.crops * highest_read * vision_layer,
        "vision_blocks_unread": work.crops * (vision.num_hidden_layers - highest_read) * vision_layer,
        "projector": projected_rows * projector_flops_per_token(config),
        "language_model": work.batch_size * text.num_hidden_layers * text_layer,
        "lm_head": 2 * logits_tokens * d * text.vocab_size,
        "manager_projector": 0,
        "manager_elementwise": 0,
    }
    if manager is not None:
        layers = len(manager.vision_layers)
        experts = sum(manager.num_experts(layer) for layer in manager.injection_layers)
        manager_rows = projected_rows if work.manager_tokens is None else work.manager_tokens
        flops["manager_projector"] = layers * manager_rows * projector_flops_per_token(config)
        flops["manager_elementwise"] = (
            manager_rows * layers * d  # layer embedding
            + work.visual_tokens * 2 * experts * d  # weighted sums of every injection layer
            + work.visual_tokens * len(manager.injection_layers) * d  # adds into the stream
        )
    return flops


def training_flops(forward: dict[str, int]) -> dict[str, int]:
    """A training step's FLOPs by component (forward + backward), from the forward's."""
    factor = {"vision_patch_embedding": 2, "vision_blocks_unread": 1}
    return {name: factor.get(name, 3) * value for name, value in forward.items()}


def matmul_total(flops: dict[str, int]) -> int:
    """What `torch.utils.flop_counter` counts (with eager attention): all but the manager's elementwise work."""
    return sum(value for name, value in flops.items() if name != "manager_elementwise")


def manager_floor_ratio(with_manager: dict[str, int], without: dict[str, int]) -> float:
    """Total FLOPs with the manager over total without: the cost ratio the manager cannot go below."""
    return sum(with_manager.values()) / sum(without.values())
