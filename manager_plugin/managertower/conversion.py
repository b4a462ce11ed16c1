"""The authors' Lightning checkpoints of ManagerTower and BridgeTower -> HF-format ManagerTower (or HF BridgeTower).

The authors' code (`src/modules/mt_module.py`, `bt_module.py`) saves `{"state_dict": ..., "hyper_parameters":
{"config": <the sacred config>}}`. The target config is derived from those hyper-parameters and from tensor shapes;
then each tensor of the target model is pulled from the original state dict by the first rule whose pattern matches
its name. Every original tensor must be used, be a known leftover of the original code, or belong to a head the
chosen class does not hold (those are reported), so nothing is dropped unnoticed. Everything is read and checked
before anything is written, and the destination appears only when complete.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoTokenizer,
    BridgeTowerConfig,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerModel,
    CLIPVisionConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RobertaConfig,
)

# The project's converters share one error type and one all-or-nothing writer.
from ..io import ConversionError, check_destination, staged_directory
from .configuration_managertower import ManagerTowerConfig
from .heads import TASK_HEADS
from .modeling_managertower import ManagerTowerModel
from .unimodal import resize_position_embedding

FORMATS = ("managertower", "hf-bridgetower")
HEADS = ("auto", "base", *TASK_HEADS)
HF_BRIDGETOWER_CLASSES: dict[str, type[PreTrainedModel]] = {
    "base": BridgeTowerModel,
    "pretrain": BridgeTowerForMaskedLM,
    "retrieval": BridgeTowerForImageAndTextRetrieval,
}
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
# RoBERTa and CLIP use 64-wide attention heads at every size; the original state dict does not record head counts.
HEAD_WIDTH = 64
ENCODER_LAYER_NORM_EPS = 1e-5  # roberta-base/large and CLIP
LAYER_NORM_EPS = 1e-5  # the original managers, link towers and task heads, and HF BridgeTower
# The original cross-modal layers and MLM transform use BertConfig's default (HF BridgeTower's use 1e-5 instead).
CROSS_MODAL_LAYER_NORM_EPS = 1e-12

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
    return tensors, _sacred_config(hparams) if isinstance(hparams, Mapping) else None


def _sacred_config(hparams: Mapping[str, Any]) -> Mapping[str, Any]:
    # `save_hyperparameters()` in `__init__(self, config)` stores the sacred config under "config".
    config = hparams.get("config")
    return config if isinstance(config, Mapping) else hparams


class _Missing(Exception):
    """An original tensor a rule needs is absent (collected, then reported together)."""


class _Source:
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
        raise _Missing(names[0])


@dataclass(frozen=True)
class _Plan:
    """What the rules need to know beyond the tensor names: the original config and the target shapes."""

    original: OriginalConfig
    expected: dict[str, torch.Size]


Getter = Callable[[_Source, "re.Match[str]", _Plan], torch.Tensor]


def _rename(template: str) -> Getter:
    """The original tensor named by `template` (backreferences `\\1`... to the target pattern's groups)."""
    return lambda source, match, plan: source.take(match.expand(template))


def _in_proj_part(source: _Source, match: re.Match[str], plan: _Plan) -> torch.Tensor:
    # `nn.MultiheadAttention` stacks the q, k and v projections in that order.
    layer, part, kind = match.groups()
    fused = source.take(f"{VISION}transformer.resblocks.{layer}.attn.in_proj_{kind}")
    return fused.chunk(3, dim=0)["qkv".index(part)]


def _position_embedding(source: _Source, match: re.Match[str], plan: _Plan) -> torch.Tensor:
    weight = source.take(VISION + "positional_embedding")
    rows = plan.expected[match.string][0]
    try:  # the original resizes the same way (bicubic) when it loads a checkpoint at another resolution
        return resize_position_embedding(weight, rows)
    except ValueError as error:
        raise ConversionError(f"{VISION}positional_embedding: {error}") from error


def _manager_prefix(match: re.Match[str]) -> str:
    modality, layer = match.group(1), match.group(2)
    return f"cross_modal_{modality}_manager_tower.{layer}.manager_layer."


def _scores(source: _Source, match: re.Match[str], plan: _Plan, name: str, num_rows: int) -> torch.Tensor:
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


def _is_adaptive(match: re.Match[str], plan: _Plan) -> bool:
    return plan.original.manager_type == "AAUE" and int(match.group(2)) > 0


def _layer_scores(source: _Source, match: re.Match[str], plan: _Plan) -> torch.Tensor:
    # SAUE: the first N scores weigh the experts (softmax); row N, if any, scales the previous output.
    n = plan.original.managed_layers
    rows = n + (int(match.group(2)) > 0)
    return _scores(source, match, plan, "layer_scores", rows)[:n].expand(n, plan.original.hidden_size)


def _previous_scale(source: _Source, match: re.Match[str], plan: _Plan) -> torch.Tensor:
    n = plan.original.managed_layers
    if _is_adaptive(match, plan):
        scale = _scores(source, match, plan, "layer_scores_cross", 1)[0]
    else:
        scale = _scores(source, match, plan, "layer_scores", n + 1)[n]
    return scale.expand(plan.original.hidden_size)


def _expert_norm(source: _Source, match: re.Match[str], plan: _Plan) -> torch.Tensor:
    # One LayerNorm per expert in the original; stacked into (N, D) here.
    prefix, kind = _manager_prefix(match), match.group(3)
    return torch.stack([source.take(f"{prefix}LayerNorm.{n}.{kind}") for n in range(plan.original.managed_layers)])


def _previous_norm(source: _Source, match: re.Match[str], plan: _Plan) -> torch.Tensor:
    return source.take(f"{_manager_prefix(match)}LayerNorm.{plan.original.managed_layers}.{match.group(3)}")


def _manager_part(name: str) -> Getter:
    return lambda source, match, plan: source.take(_manager_prefix(match) + match.expand(name))


def _link_tower(source: _Source, match: re.Match[str], plan: _Plan) -> torch.Tensor:
    # BridgeTower's link tower l-1 is the LayerNorm in front of cross-modal layer l.
    modality, layer, kind = match.groups()
    return source.take(f"cross_modal_{modality}_link_tower.{int(layer) - 1}.LayerNorm.{kind}")


def _layer_embedding(source: _Source, match: re.Match[str], plan: _Plan) -> torch.Tensor:
    # The original keeps one row per uni-modal layer and uses the rows of the managed (top) layers.
    table = source.take(f"layer_embeddings_{match.group(1)}.weight")
    return table[-plan.original.managed_layers :]


def _itc_head(source: _Source, match: re.Match[str], plan: _Plan) -> torch.Tensor:
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
# Original head tensors: carried over only by a class with that head.
HEAD_TENSORS = re.compile(
    r"^((mlm_score|itm_score|vqa_classifier|snli_classifier|nlvr2_classifier|(cross_modal_)?itc_(text|image)_head)"
    r"\..+|temperature)$"
)


def _resolve(
    tensors: dict[str, torch.Tensor], rules: tuple[tuple[str, Getter], ...], plan: _Plan
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Each target tensor from the original ones, checked against its expected shape; and the original names used."""
    compiled = [(re.compile(pattern), getter) for pattern, getter in rules]
    source = _Source(tensors)
    values: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name, shape in plan.expected.items():
        pattern, getter = next((p, g) for p, g in compiled if p.match(name))
        source.read = []
        try:
            value = getter(source, pattern.match(name), plan)
        except _Missing as error:
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


def _count(tensors: dict[str, torch.Tensor], pattern: str) -> int:
    return sum(1 for key in tensors if re.fullmatch(pattern, key))


def _shape(tensors: dict[str, torch.Tensor], key: str, needed_for: str) -> torch.Size:
    if key not in tensors:
        raise ConversionError(f"missing tensor in the checkpoint: {key!r} (needed to infer {needed_for})")
    return tensors[key].shape


def _heads_for(width: int, what: str) -> int:
    if width % HEAD_WIDTH:
        raise ConversionError(
            f"the {what} is {width} wide: its number of attention heads is not recorded, and {width} is not a "
            f"multiple of the {HEAD_WIDTH}-wide heads of RoBERTa and CLIP"
        )
    return width // HEAD_WIDTH


def text_config_from(tensors: dict[str, torch.Tensor]) -> RobertaConfig:
    """The RoBERTa config of the original `text_transformer` (a `RobertaModel.from_pretrained`), from its shapes."""
    vocab_size, width = _shape(tensors, TEXT + "embeddings.word_embeddings.weight", "the text encoder")
    return RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=_count(tensors, re.escape(TEXT) + r"encoder\.layer\.\d+\.attention\.self\.query\.weight"),
        num_attention_heads=_heads_for(width, "text encoder"),
        intermediate_size=_shape(tensors, TEXT + "encoder.layer.0.intermediate.dense.weight", "the text encoder")[0],
        max_position_embeddings=_shape(tensors, TEXT + "embeddings.position_embeddings.weight", "the text encoder")[0],
        type_vocab_size=_shape(tensors, TEXT + "embeddings.token_type_embeddings.weight", "the text encoder")[0],
        layer_norm_eps=ENCODER_LAYER_NORM_EPS,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def vision_config_from(tensors: dict[str, torch.Tensor], original: OriginalConfig, image_size: int) -> CLIPVisionConfig:
    """The CLIP ViT config of the original `vit_model.visual`, from its shapes, at `image_size`."""
    width, channels, patch, _ = _shape(tensors, VISION + "conv1.weight", "the vision encoder")
    if original.patch_size is not None and original.patch_size != patch:
        raise ConversionError(
            f"hyper-parameter patch_size {original.patch_size} differs from the {patch}x{patch} patches of "
            f"{VISION}conv1.weight"
        )
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=_shape(tensors, VISION + "transformer.resblocks.0.mlp.c_fc.weight", "the vision encoder")[0],
        num_hidden_layers=_count(tensors, re.escape(VISION) + r"transformer\.resblocks\.\d+\.attn\.in_proj_weight"),
        num_attention_heads=_heads_for(width, "vision encoder"),
        num_channels=channels,
        image_size=image_size,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=ENCODER_LAYER_NORM_EPS,
    )


def managertower_config(
    tensors: dict[str, torch.Tensor], original: OriginalConfig, head: str, image_size: int
) -> ManagerTowerConfig:
    """The `ManagerTowerConfig` of the original model (`bridge` managers for BridgeTower)."""
    extra: dict[str, Any] = {}
    if head == "vqav2":
        extra["num_labels"] = original.vqav2_label_size
    text, vision = text_config_from(tensors), vision_config_from(tensors, original, image_size)
    num_token_types = _shape(tensors, "token_type_embeddings.weight", "the number of token types")[0]
    try:
        return ManagerTowerConfig(
            hidden_size=original.hidden_size,
            num_hidden_layers=original.num_layers,
            num_attention_heads=original.num_heads,
            intermediate_size=original.hidden_size * original.mlp_ratio,
            hidden_act="gelu",
            hidden_dropout_prob=original.drop_rate,
            attention_probs_dropout_prob=original.drop_rate,
            layer_norm_eps=LAYER_NORM_EPS,
            cross_modal_layer_norm_eps=CROSS_MODAL_LAYER_NORM_EPS,
            num_token_types=num_token_types,
            manager_type=original.manager_type or "bridge",
            num_managed_layers=original.num_managed_layers,
            manager_temperature=original.manager_softmax_temperature,
            manager_query_mask=False,  # the original attends over text padding too
            contrastive_hidden_size=original.contrastive_hidden_size,
            contrastive_temperature=original.temperature,
            head_hidden_scale=original.head_hidden_scale,
            classifier_dropout=original.nlvr2_drop_rate,
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            **extra,
        )
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(
            f"the hyper-parameters and shapes do not make a valid ManagerTowerConfig: {error}"
        ) from error


def bridgetower_config(
    tensors: dict[str, torch.Tensor], original: OriginalConfig, image_size: int
) -> BridgeTowerConfig:
    """The HF `BridgeTowerConfig` of an original BridgeTower, if HF's BridgeTower can hold it."""
    text = text_config_from(tensors)
    vision = vision_config_from(tensors, original, image_size)
    # HF builds its cross-modal layers from the text encoder's config, so their sizes must coincide.
    for name, ours, theirs in (
        ("hidden_size", original.hidden_size, text.hidden_size),
        ("num_heads", original.num_heads, text.num_attention_heads),
        ("hidden_size * mlp_ratio", original.hidden_size * original.mlp_ratio, text.intermediate_size),
    ):
        if ours != theirs:
            raise ConversionError(
                f"cross-modal {name} {ours} differs from the text encoder's {theirs}: HF BridgeTower builds its "
                "cross-modal layers from the text config, so it cannot hold this model; use --format managertower"
            )
    return BridgeTowerConfig(
        hidden_size=original.hidden_size,
        num_hidden_layers=original.num_layers,
        num_attention_heads=original.num_heads,
        hidden_act="gelu",
        layer_norm_eps=LAYER_NORM_EPS,
        share_cross_modal_transformer_layers=True,
        share_link_tower_layers=False,
        link_tower_type="add",
        init_layernorm_from_vision_encoder=False,
        contrastive_hidden_size=original.contrastive_hidden_size,
        tie_word_embeddings=False,
        text_config={
            **text.to_dict(),
            "layer_norm_eps": LAYER_NORM_EPS,
            "hidden_dropout_prob": original.drop_rate,
            "attention_probs_dropout_prob": original.drop_rate,
        },
        vision_config={
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_channels": vision.num_channels,
            "patch_size": vision.patch_size,
            "image_size": image_size,
            "layer_norm_eps": ENCODER_LAYER_NORM_EPS,
            "share_layernorm": True,
            "remove_last_layer": False,
        },
    )


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
    `tokenizer`: a tokenizer (directory or hub name) to save with the model.
    """
    checkpoint, destination = Path(checkpoint), Path(destination)
    if head not in HEADS:
        raise ConversionError(f"unknown head {head!r}: expected one of {list(HEADS)}")
    if output_format not in FORMATS:
        raise ConversionError(f"unknown format {output_format!r}: expected one of {list(FORMATS)}")
    check_destination(destination)
    tensors, saved_hparams = load_lightning_checkpoint(checkpoint)
    if isinstance(hparams, (str, Path)):
        hparams = _read_hparams(Path(hparams))
    hparams = _sacred_config(hparams) if hparams is not None else saved_hparams
    if hparams is None:
        raise ConversionError(
            f"{checkpoint} has no hyper_parameters (the authors' sacred config): pass them with --hparams FILE.json"
        )
    original = OriginalConfig.from_hparams(hparams)
    head = original.auto_head() if head == "auto" else head
    model, rules, expected = _target(tensors, original, head, output_format, image_size or original.image_size)
    prefix = f"{model.base_model_prefix}."
    plan = _Plan(original=original, expected={n.removeprefix(prefix): s for n, s in expected.items()})
    values, used = _resolve(tensors, rules, plan)
    unused = sorted(set(tensors) - used)
    unexpected = [name for name in unused if not (LEFTOVERS.match(name) or HEAD_TENSORS.match(name))]
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
    with staged_directory(destination) as staging:
        model.save_pretrained(staging, state_dict=state)
        if loaded_tokenizer is not None:
            loaded_tokenizer.save_pretrained(staging)
    return ConversionResult(destination=destination, architecture=type(model).__name__, dropped=tuple(unused))


def _read_hparams(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"cannot read hyper-parameters from {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object (the authors' config), got {type(data).__name__}")
    return data


def _load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot load the tokenizer {source}: {error}") from error


__all__ = [
    "FORMATS",
    "HEADS",
    "ConversionError",
    "ConversionResult",
    "OriginalConfig",
    "bridgetower_config",
    "convert_lightning_checkpoint",
    "load_lightning_checkpoint",
    "managertower_config",
]
