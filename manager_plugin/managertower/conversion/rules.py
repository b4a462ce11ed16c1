"""The key mapping: each tensor of the target model, pulled from the original state dict by the first matching rule."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...io import ConversionError
from ..unimodal import resize_position_embedding
from .original import BLOCK, TEXT, VISION, OriginalConfig


class MissingTensor(Exception):
    """An original tensor a rule needs is absent (collected, then reported together)."""


class Source:
    """The original state dict: records what was used, and what the current rule read (for messages)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()
        self.read: list[str] = []

    def take(self, *names: str) -> torch.Tensor:
        """The first of `names` present (later ones are aliases used by other versions of the authors' code)."""
        for name in names:
            if name in self.tensors:
                self.used.add(name)
                self.read.append(name)
                return self.tensors[name]
        raise MissingTensor(names[0])


@dataclass(frozen=True)
class Plan:
    """What the rules need to know beyond the tensor names: the original config and the target shapes."""

    original: OriginalConfig
    expected: dict[str, torch.Size]


Getter = Callable[[Source, "re.Match[str]", Plan], torch.Tensor]


def _rename(template: str) -> Getter:
    """The original tensor named by `template` (backreferences `\\1`... to the target pattern's groups)."""
    return lambda source, match, plan: source.take(match.expand(template))


def _in_proj_part(source: Source, match: re.Match[str], plan: Plan) -> torch.Tensor:
    # `nn.MultiheadAttention` stacks the q, k and v projections in that order.
    layer, part, kind = match.groups()
    fused = source.take(f"{VISION}transformer.resblocks.{layer}.attn.in_proj_{kind}")
    return fused.chunk(3, dim=0)["qkv".index(part)]


def _position_embedding(source: Source, match: re.Match[str], plan: Plan) -> torch.Tensor:
    weight = source.take(VISION + "positional_embedding")
    rows = plan.expected[match.string][0]
    try:  # the original resizes the same way (bicubic) when it loads a checkpoint at another resolution
        return resize_position_embedding(weight, rows)
    except ValueError as error:
        raise ConversionError(f"{VISION}positional_embedding: {error}") from error


def _manager_prefix(match: re.Match[str]) -> str:
    modality, layer = match.group(1), match.group(2)
    return f"cross_modal_{modality}_manager_tower.{layer}.manager_layer."


def _scores(source: Source, match: re.Match[str], plan: Plan, name: str, num_rows: int) -> torch.Tensor:
    """An original score tensor `(1, num_rows, 1, D)`, or `(1, num_rows, 1, 1)` for manager_weight_type scalar."""
    key = _manager_prefix(match) + name
    scores = source.take(key)
    width = 1 if plan.original.manager_weight_type == "scalar" else plan.original.hidden_size
    if tuple(scores.shape) != (1, num_rows, 1, width):
        raise ConversionError(
            f"{key} has shape {tuple(scores.shape)}, expected {(1, num_rows, 1, width)} (managed_layers "
            f"{plan.original.managed_layers}, manager_weight_type {plan.original.manager_weight_type!r})"
        )
    return scores[0, :, 0]


def _is_adaptive(match: re.Match[str], plan: Plan) -> bool:
    return plan.original.manager_type == "AAUE" and int(match.group(2)) > 0


def _layer_scores(source: Source, match: re.Match[str], plan: Plan) -> torch.Tensor:
    # SAUE: the first N scores weigh the experts (softmax); row N, if any, scales the previous output.
    n = plan.original.managed_layers
    rows = n + (int(match.group(2)) > 0)
    return _scores(source, match, plan, "layer_scores", rows)[:n].expand(n, plan.original.hidden_size)


def _previous_scale(source: Source, match: re.Match[str], plan: Plan) -> torch.Tensor:
    n = plan.original.managed_layers
    if _is_adaptive(match, plan):
        scale = _scores(source, match, plan, "layer_scores_cross", 1)[0]
    else:
        scale = _scores(source, match, plan, "layer_scores", n + 1)[n]
    return scale.expand(plan.original.hidden_size)


def _expert_norm(source: Source, match: re.Match[str], plan: Plan) -> torch.Tensor:
    # One LayerNorm per expert in the original; stacked into (N, D) here.
    prefix, kind = _manager_prefix(match), match.group(3)
    return torch.stack([source.take(f"{prefix}LayerNorm.{n}.{kind}") for n in range(plan.original.managed_layers)])


def _previous_norm(source: Source, match: re.Match[str], plan: Plan) -> torch.Tensor:
    return source.take(f"{_manager_prefix(match)}LayerNorm.{plan.original.managed_layers}.{match.group(3)}")


def _manager_part(name: str) -> Getter:
    return lambda source, match, plan: source.take(_manager_prefix(match) + match.expand(name))


def _link_tower(source: Source, match: re.Match[str], plan: Plan) -> torch.Tensor:
    # BridgeTower's link tower l-1 is the LayerNorm in front of cross-modal layer l.
    modality, layer, kind = match.groups()
    return source.take(f"cross_modal_{modality}_link_tower.{int(layer) - 1}.LayerNorm.{kind}")


def _layer_embedding(source: Source, match: re.Match[str], plan: Plan) -> torch.Tensor:
    # The original keeps one row per uni-modal layer and uses the rows of the managed (top) layers.
    table = source.take(f"layer_embeddings_{match.group(1)}.weight")
    return table[-plan.original.managed_layers :]


def _itc_head(source: Source, match: re.Match[str], plan: Plan) -> torch.Tensor:
    # ManagerTower's code names BridgeTower's `itc_{text,image}_head` `cross_modal_itc_...`; both wrap a Linear `fc`.
    return source.take(match.expand(r"cross_modal_itc_\1_head.fc.\2"), match.expand(r"itc_\1_head.fc.\2"))


# (target name pattern, getter of its value from the original tensors): the first pattern that matches wins.
_LAYER = r"^vision_model\.encoder\.layers\.(\d+)\."
_MANAGER = r"^cross_modal_(text|image)_managers\.(\d+)\."
_COMMON_RULES: tuple[tuple[str, Getter], ...] = (
    (r"^cross_modal_itc_(text|image)_head\.(weight|bias)$", _itc_head),
    (r"^itc_temperature$", _rename("temperature")),
    (r"^(.+)$", _rename(r"\1")),  # transforms, token types, cross-modal layers, poolers, other heads: same names
)
MANAGERTOWER_RULES: tuple[tuple[str, Getter], ...] = (
    (r"^text_model\.(.+)$", _rename(TEXT + r"\1")),
    (r"^vision_model\.embeddings\.class_embedding$", _rename(VISION + "class_embedding")),
    (r"^vision_model\.embeddings\.patch_embedding\.weight$", _rename(VISION + "conv1.weight")),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", _position_embedding),
    (r"^vision_model\.pre_layrnorm\.(weight|bias)$", _rename(VISION + r"ln_pre.\1")),
    (r"^vision_model\.post_layernorm\.(weight|bias)$", _rename(VISION + r"ln_post.\1")),
    (_LAYER + r"self_attn\.([qkv])_proj\.(weight|bias)$", _in_proj_part),
    (_LAYER + r"self_attn\.out_proj\.(weight|bias)$", _rename(BLOCK + r"attn.out_proj.\2")),
    (_LAYER + r"layer_norm([12])\.(weight|bias)$", _rename(BLOCK + r"ln_\2.\3")),
    (_LAYER + r"mlp\.fc1\.(weight|bias)$", _rename(BLOCK + r"mlp.c_fc.\2")),
    (_LAYER + r"mlp\.fc2\.(weight|bias)$", _rename(BLOCK + r"mlp.c_proj.\2")),
    (r"^(text|image)_layer_embedding\.weight$", _layer_embedding),
    (_MANAGER + r"layer_scores$", _layer_scores),
    (_MANAGER + r"previous_scale$", _previous_scale),
    (_MANAGER + r"expert_norm\.(weight|bias)$", _expert_norm),
    (_MANAGER + r"previous_norm\.(weight|bias)$", _previous_norm),
    (_MANAGER + r"temperature$", _manager_part("softmax_temperature")),
    (_MANAGER + r"query_norm\.(weight|bias)$", _manager_part(r"extra_query_LayerNorm.\3")),
    (_MANAGER + r"query_attention\.([qk])_proj\.(weight|bias)$", _manager_part(r"fusion_attention.\3_proj.\4")),
    (_MANAGER + r"controller\.(weight|bias)$", _manager_part(r"linear_controller.\3")),
    (r"^cross_modal_(text|image)_managers\.0\.norm\.(weight|bias)$", _rename(r"cross_modal_\1_layernorm.\2")),
    (_MANAGER + r"norm\.(weight|bias)$", _link_tower),
    *_COMMON_RULES,
)  # fmt: skip
HF_BRIDGETOWER_RULES: tuple[tuple[str, Getter], ...] = (
    (r"^text_model\.(.+)$", _rename(TEXT + r"\1")),
    (r"^vision_model\.visual\.embeddings\.class_embedding$", _rename(VISION + "class_embedding")),
    (r"^vision_model\.visual\.embeddings\.patch_embedding\.weight$", _rename(VISION + "conv1.weight")),
    (r"^vision_model\.visual\.embeddings\.position_embedding\.weight$", _position_embedding),
    (r"^vision_model\.visual\.(.+)$", _rename(VISION + r"\1")),
    *_COMMON_RULES,
)  # fmt: skip

# Original tensors no converted model holds: CLIP's text-tower leftovers, the second (unused) manager temperature,
# ViLT's rank_output, metric states, and the RoBERTa pooler (which ManagerTower never builds).
LEFTOVERS = re.compile(
    r"^(vit_model\.positional_embedding|vit_model\.ln_final\..+|.+\.softmax_temperature_cross|rank_output\..+"
    r"|(train|val|test)_\w+\..+|text_transformer\.pooler\..+)$"
)
# Buffers the original modules fill themselves (no learned values): transformers < 4.31 saves RoBERTa's position ids
# with the weights (4.17, which the authors pin, does), and some 4.x versions its all-zero token type ids too.
# Each must hold what its module builds (from the `max_position_embeddings` rows of the position table); they are
# listed as not carried over, since the HF modules rebuild them.
CONSTANT_BUFFERS: dict[str, tuple[str, Callable[[int], torch.Tensor]]] = {
    TEXT + "embeddings.position_ids": ("0, 1, ..., rows - 1", lambda rows: torch.arange(rows)[None]),
    TEXT + "embeddings.token_type_ids": ("zeros", lambda rows: torch.zeros(1, rows, dtype=torch.long)),
}
# Original head tensors: carried over only by a class with that head.
HEAD_TENSORS = re.compile(
    r"^((mlm_score|itm_score|vqa_classifier|snli_classifier|nlvr2_classifier|(cross_modal_)?itc_(text|image)_head)"
    r"\..+|temperature)$"
)


def resolve(
    tensors: dict[str, torch.Tensor], rules: tuple[tuple[str, Getter], ...], plan: Plan
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Each target tensor from the original ones, checked against its expected shape; and the original names used."""
    compiled = [(re.compile(pattern), getter) for pattern, getter in rules]
    source = Source(tensors)
    values: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name, shape in plan.expected.items():
        pattern, getter = next((p, g) for p, g in compiled if p.match(name))
        source.read = []
        try:
            value = getter(source, pattern.match(name), plan)
        except MissingTensor as error:
            missing.append(str(error))
            continue
        if value.shape != shape:
            raise ConversionError(
                f"{', '.join(source.read)} gives {name} of shape {tuple(value.shape)}, but the model built from the "
                f"hyper-parameters needs {tuple(shape)}"
            )
        values[name] = value.clone(memory_format=torch.contiguous_format)  # slices and broadcasts become tensors
    if missing:
        missing = sorted(set(missing))
        raise ConversionError(f"missing tensors in the checkpoint ({len(missing)}): {missing[:10]}")
    return values, source.used


def check_constant_buffers(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The constant buffers present in `tensors`, each checked to hold what its module builds."""
    present = [name for name in CONSTANT_BUFFERS if name in tensors]
    if not present:
        return []
    rows = tensors[TEXT + "embeddings.position_embeddings.weight"].shape[0]
    for name in present:
        description, build = CONSTANT_BUFFERS[name]
        expected, value = build(rows), tensors[name]
        if value.shape != expected.shape or not torch.equal(value.to(expected.dtype), expected):
            raise ConversionError(
                f"{name} of shape {tuple(value.shape)} does not hold {description} of shape {tuple(expected.shape)}, "
                "the values its RoBERTa module builds for the checkpoint's position table: not an authors' checkpoint"
            )
    return present
