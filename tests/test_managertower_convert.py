"""The authors' ManagerTower / BridgeTower Lightning checkpoints -> HF: outputs equal the original formulas, round
trips are lossless, bad checkpoints fail clearly and write nothing.

Synthetic checkpoints are built as the authors' code builds them: their modules' layout and buffers (RoBERTa's
persistent `position_ids` under transformers 4.17), randomised, saved as PyTorch-Lightning 1.5.10 saves them (the
sacred config as `hyper_parameters = {"config": ...}`). The reference forward below runs on that original state dict
with the original code's formulas, in plain torch; an inverse mapping written here checks the round trip.
"""

from __future__ import annotations

import json
import lzma
import math
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerImageProcessor,
    RobertaConfig,
    RobertaModel,
)

from manager_plugin.managertower import TASK_HEADS, ManagerTowerConfig, ManagerTowerModel, ManagerTowerProcessor
from manager_plugin.managertower.conversion import ConversionError, convert_lightning_checkpoint
from manager_plugin.managertower.convert import main
from manager_plugin.managertower.tiny import build_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")  # the tiny model is fastest on one thread

VOCAB, WIDTH, HEADS, LAYERS, CROSS, MANAGED, IMAGE, PATCH = 100, 128, 2, 3, 2, 2, 32, 8
BATCH, LENGTH = 3, 7
V = "vit_model.visual."
ORIGINAL_EPS = 1e-12  # BertConfig's default: the original cross-modal layers and MLM transform
LN_EPS = 1e-5  # nn.LayerNorm's default: managers, link towers, CLIP, task heads
EXACT_TOL = 2e-5

TASK_LOSSES = {
    "pretrain": {"mlm": 1, "itm": 1},
    "vqav2": {"vqa": 1},
    "snli_ve": {"snli": 1},
    "nlvr2": {"nlvr2": 1},
    "retrieval": {"irtr_itm_itc": 1},
    "base": {},
}


def hparams(model_type: str = "MT", head: str = "pretrain", **overrides) -> dict:
    """The whole sacred config the authors' `run.py` hands their module (`src/config.py` defaults, then the named
    configs `mt`/`bt`, `clip16`, `text_roberta` and a task), at the tiny sizes; what `save_hyperparameters` keeps."""
    losses = dict.fromkeys(("itm", "mlm", "itc", "itm_itc", "irtr_itm_itc", "vqa", "nlvr2", "irtr", "snli"), 0)
    losses.update(TASK_LOSSES[head])
    config = {
        "root_dir": "~/MT", "data_root": "~/MT/dataset/fine-tune", "log_dir": "~/MT/logs",
        "output_dir": "~/MT/checkpoints", "load_path": "./best_checkpoints/ManagerTower_pt_base.ckpt", "num_gpus": 8,
        "num_nodes": 1, "num_workers": 8, "precision": 32, "per_gpu_batchsize": 4, "per_gpu_eval_batchsize": 16,
        "exp_name": model_type, "group_name": "vqa", "run_name": "ftfpt-576-4-16", "resume_from": None,
        "fast_dev_run": False, "val_check_interval": 1.0, "test_only": False, "log_every_n_steps": 50, "seed": 0,
        "datasets": ["vqa"], "loss_names": losses, "batch_size": 504,
        # Pre-training uses `clip`; the fine-tuning scripts name `albef_randaug_wohf`, evaluated with `albef`.
        "train_transform_keys": ["clip"] if head == "pretrain" else ["albef_randaug_wohf"],
        "val_transform_keys": ["clip"] if head == "pretrain" else ["albef"], "image_size": IMAGE, "patch_size": PATCH, "draw_false_image": 0,
        "image_only": False, "resolution_before": 224, "vqav2_label_size": 5, "max_text_len": 50,
        "tokenizer": "roberta-base", "vocab_size": VOCAB, "whole_word_masking": False, "mlm_prob": 0.15,
        "draw_false_text": 0, "input_image_embed_size": WIDTH, "input_text_embed_size": WIDTH,
        "vit": "CLIP-ViT-B/16", "hidden_size": WIDTH, "num_heads": HEADS, "num_layers": CROSS, "mlp_ratio": 4,
        "drop_rate": 0.1, "optim_type": "adamw", "learning_rate": 9e-6, "weight_decay": 0.06, "decay_power": 1,
        "max_epoch": 10, "max_steps": -1, "warmup_steps": 0.1, "end_lr": 0, "lr_mult_head": 50,
        "lr_mult_cross_modal": 5, "get_recall_metric": False, "debug_num": 0, "meter_fusion": False,
        "vit_remove_last": False, "model_type": model_type, "vit_layernorm_shared": True,
        "vit_layernorm_init_from_vit": False, "task_head_layers": 2, "head_hidden_scale": 2,
        "per_gpu_eval_batchsize_text": 256, "per_gpu_eval_batchsize_image": 128,
        "per_gpu_eval_batchsize_fusion_text": 500, "k_test": 128, "amp_flag": True, "task_threshold": 0,
        "nlvr2_drop_rate": 0.1, "temperature": 0.07, "contrastive_hidden_size": 16, "gather_all_inputs": False,
        "gather_global_negative": False, "gather_all_image_inputs": False, "image_chunks": 1, "text_chunks": 1,
        "save_memory": False, "manager_type": "AAUE", "managed_layers_text": MANAGED,
        "managed_layers_image": MANAGED, "manager_learnable": True, "manager_weight_type": "vector",
        "manager_softmax_temperature": 1, "manager_softmax_temperature_learnable": True,
    }  # fmt: skip
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------------------------------------------
# The authors' modules, as their code lays them out (`src/modules/mt_module.py`, `bt_module.py`, `heads.py`,
# `clip_model.py`, `bert_model.py`), with the buffers transformers 4.17 registers: written here from reading that
# code, independently of the converter. Only what shapes the state dict is kept; the forward is `reference` below.


def _module(**children: nn.Module | nn.Parameter) -> nn.Module:
    """A module holding `children` under their names (parameters as parameters)."""
    module = nn.Module()
    for name, child in children.items():
        setattr(module, name, child)
    return module


def _fc(width: int, out: int) -> nn.Module:
    return _module(fc=nn.Linear(width, out))  # heads.ITMHead / ITCHead


def _attention_module(width: int, eps: float) -> nn.Module:
    # bert_model.BertAttention: BertSelfAttention (query, key, value) and BertSelfOutput (dense, LayerNorm).
    attention = _module(query=nn.Linear(width, width), key=nn.Linear(width, width), value=nn.Linear(width, width))
    return _module(self=attention, output=_module(dense=nn.Linear(width, width), LayerNorm=nn.LayerNorm(width, eps)))


def _cross_layer_module(width: int, mlp: int, eps: float) -> nn.Module:
    return _module(
        attention=_attention_module(width, eps),
        crossattention=_attention_module(width, eps),
        intermediate=_module(dense=nn.Linear(width, mlp)),
        output=_module(dense=nn.Linear(mlp, width), LayerNorm=nn.LayerNorm(width, eps)),
    )


def _clip_module(width: int, layers: int, patch: int, resolution: int) -> nn.Module:
    """clip_model.CLIP as `build_model` makes it: the visual tower plus the text tower's leftovers."""
    blocks = nn.Sequential(*[
        _module(
            attn=nn.MultiheadAttention(width, width // 64),
            ln_1=nn.LayerNorm(width),
            mlp=nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.Identity(),
                                          c_proj=nn.Linear(4 * width, width))),
            ln_2=nn.LayerNorm(width),
        )
        for _ in range(layers)
    ])  # fmt: skip
    visual = _module(
        conv1=nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False),
        class_embedding=nn.Parameter(torch.zeros(width)),
        positional_embedding=nn.Parameter(torch.zeros((resolution // patch) ** 2 + 1, width)),
        ln_pre=nn.LayerNorm(width),
        transformer=_module(resblocks=blocks),
        ln_post=nn.LayerNorm(width),
    )
    return _module(visual=visual, positional_embedding=nn.Parameter(torch.zeros(16, 64)), ln_final=nn.LayerNorm(64))


def _roberta_4_17() -> nn.Module:
    """`RobertaModel.from_pretrained` under transformers 4.17: with its pooler, and `position_ids` a persistent
    buffer (saved with the weights); `token_type_ids` is not persistent there."""
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=WIDTH // 64,
        intermediate_size=4 * WIDTH, max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=LN_EPS,
    )  # fmt: skip
    roberta = RobertaModel(config, add_pooling_layer=True)
    embeddings = roberta.embeddings
    embeddings.register_buffer("position_ids", torch.arange(40).expand((1, -1)), persistent=True)
    return roberta


def _saue_module(config: dict, experts: int, layer: int) -> nn.Module:
    rows, width = experts + (layer > 0), 1 if config["manager_weight_type"] == "scalar" else config["hidden_size"]
    return _module(
        layer_scores=nn.Parameter(torch.zeros(1, rows, 1, width)),
        LayerNorm=nn.ModuleList(nn.LayerNorm(config["hidden_size"]) for _ in range(rows)),
        softmax_temperature=nn.Parameter(torch.ones(1)),
        softmax_temperature_cross=nn.Parameter(torch.ones(1)),
    )


def _aaue_module(config: dict, experts: int) -> nn.Module:
    hidden = config["hidden_size"]
    width = 1 if config["manager_weight_type"] == "scalar" else hidden
    return _module(
        layer_scores_cross=nn.Parameter(torch.zeros(1, 1, 1, width)),
        linear_controller=nn.Linear(2 * hidden, experts),
        fusion_attention=_module(q_proj=nn.Linear(hidden, hidden), k_proj=nn.Linear(hidden, hidden)),
        LayerNorm=nn.ModuleList(nn.LayerNorm(hidden) for _ in range(experts + 1)),
        extra_query_LayerNorm=nn.LayerNorm(hidden),
        softmax_temperature=nn.Parameter(torch.ones(1)),
        softmax_temperature_cross=nn.Parameter(torch.ones(1)),
    )


def _classifier_head(width: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out))


def original_module(config: dict) -> nn.Module:
    """The authors' `MTTransformer` / `BTTransformer` built from their sacred config (modules in their order)."""
    hs, layers, tasks = config["hidden_size"], config["num_layers"], config["loss_names"]
    mlp, eps = hs * config["mlp_ratio"], ORIGINAL_EPS  # their cross layers' RobertaConfig keeps BertConfig's eps
    model = nn.Module()
    model.cross_modal_text_transform = nn.Linear(config["input_text_embed_size"], hs)
    model.cross_modal_image_transform = nn.Linear(config["input_image_embed_size"], hs)
    model.token_type_embeddings = nn.Embedding(2, hs)
    model.vit_model = _clip_module(WIDTH, LAYERS, config["patch_size"], config["image_size"])
    model.text_transformer = _roberta_4_17()
    model.cross_modal_image_layers = nn.ModuleList(_cross_layer_module(hs, mlp, eps) for _ in range(layers))
    model.cross_modal_text_layers = nn.ModuleList(_cross_layer_module(hs, mlp, eps) for _ in range(layers))
    model.cross_modal_image_pooler = _module(dense=nn.Linear(hs, hs))
    model.cross_modal_text_pooler = _module(dense=nn.Linear(hs, hs))
    model.temperature = nn.Parameter(torch.ones([]) * config["temperature"])
    if tasks["mlm"] > 0:
        transform = _module(dense=nn.Linear(hs, hs), LayerNorm=nn.LayerNorm(hs, eps))
        model.mlm_score = _module(
            transform=transform,
            decoder=nn.Linear(hs, config["vocab_size"], bias=False),
            bias=nn.Parameter(torch.zeros(config["vocab_size"])),
        )
    if tasks["itm"] > 0 or tasks["itm_itc"] > 0 or tasks["irtr_itm_itc"] > 0:
        model.itm_score = _fc(2 * hs, 2)
    if tasks["itc"] > 0 or tasks["itm_itc"] > 0 or tasks["irtr_itm_itc"] > 0:
        itc = "cross_modal_itc" if config["model_type"] == "MT" else "itc"  # BridgeTower's repository: `itc_*_head`
        setattr(model, f"{itc}_text_head", _fc(hs, config["contrastive_hidden_size"]))
        setattr(model, f"{itc}_image_head", _fc(hs, config["contrastive_hidden_size"]))
    if config["model_type"] == "MT":
        model.layer_embeddings_text = nn.Embedding(LAYERS, hs)
        model.layer_embeddings_image = nn.Embedding(LAYERS, hs)
        for modality in ("text", "image"):
            experts = config[f"managed_layers_{modality}"]
            tower = nn.ModuleList(
                _module(manager_layer=_aaue_module(config, experts))
                if config["manager_type"] == "AAUE" and layer > 0
                else _module(manager_layer=_saue_module(config, experts, layer))
                for layer in range(layers)
            )
            setattr(model, f"cross_modal_{modality}_manager_tower", tower)
    else:
        model.cross_modal_text_layernorm = nn.LayerNorm(hs)
        model.cross_modal_image_layernorm = nn.LayerNorm(hs)
        model.cross_modal_text_link_tower = nn.ModuleList(
            _module(LayerNorm=nn.LayerNorm(hs)) for _ in range(layers - 1)
        )
        model.cross_modal_image_link_tower = nn.ModuleList(
            _module(LayerNorm=nn.LayerNorm(hs)) for _ in range(layers - 1)
        )
    scale = config["head_hidden_scale"]
    if tasks["vqa"] > 0:
        model.vqa_classifier = _classifier_head(2 * hs, 2 * hs * scale, config["vqav2_label_size"])
    if tasks["nlvr2"] > 0:
        model.nlvr2_classifier = _classifier_head(4 * hs, 2 * hs * scale, 2)
        model.nlvr2_classifier_dropout = nn.Dropout(config["nlvr2_drop_rate"])
        model.token_type_embeddings = nn.Embedding(3, hs)  # rebuilt with a third row (a copy of the image row)
    if tasks["snli"] > 0:
        model.snli_classifier = _classifier_head(2 * hs, 2 * hs * scale, 3)
    return model


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (temperatures positive, LayerNorm gains near 1), so a misplaced tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("temperature"):
                parameter.copy_(0.5 + noise.abs().clamp(max=1.5))
            elif "layer_scores" in name:
                parameter.copy_(noise)
            elif re.search(r"(norm|ln_\w+)\.weight$", name, flags=re.IGNORECASE):
                parameter.copy_(1 + 0.2 * noise)
            elif parameter.dim() == 1:
                parameter.copy_(0.1 * noise)
            else:
                parameter.copy_(noise / math.sqrt(parameter[0].numel()))
    return model


def lightning_checkpoint(state_dict: dict, config: dict | None) -> dict:
    """What PyTorch-Lightning 1.5.10's `dump_checkpoint` writes for the authors' module (`ModelCheckpoint`, AdamW
    with a polynomial-decay LambdaLR, fp32), `hyper_parameters` as `save_hyperparameters()` in `__init__(config)`
    keeps them."""
    callback = "ModelCheckpoint{'monitor': 'val/the_metric', 'mode': 'max', 'every_n_train_steps': 0, " + (
        "'every_n_epochs': 1, 'train_time_interval': None, 'save_on_train_epoch_end': True}"
    )
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "1.5.10",
        "state_dict": OrderedDict(state_dict),
        "callbacks": {
            callback: {
                "monitor": "val/the_metric", "best_model_score": torch.tensor(0.71), "best_model_path": "a.ckpt",
                "current_score": torch.tensor(0.71), "dirpath": "~/MT/checkpoints", "best_k_models": {},
                "kth_best_model_path": "", "kth_value": torch.tensor(-float("inf")), "last_model_path": "",
            }
        },
        "optimizer_states": [{
            "state": {0: {"step": 120, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}},
            "param_groups": [{"lr": 9e-6, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.06,
                              "correct_bias": True, "initial_lr": 9e-6, "params": [0]}],
        }],
        "lr_schedulers": [{
            "base_lrs": [9e-6], "last_epoch": 120, "verbose": False, "_step_count": 121,
            "_get_lr_called_within_step": False, "_last_lr": [8e-6], "lr_lambdas": [None],
        }],
    }  # fmt: skip
    if config is not None:
        checkpoint["hparams_name"] = "kwargs"
        checkpoint["hyper_parameters"] = {"config": config}
    return checkpoint


def to_original(model, model_type: str, weight_type: str = "vector", itc_prefix: str = "cross_modal_itc") -> dict:
    """The original tensors a converted `model` holds, named and shaped as the authors' code names them: the inverse
    of the conversion, written apart (layer embeddings: the rows of the managed layers only)."""
    config = model.config
    n, hidden = config.num_managed_layers, config.hidden_size
    state = {name.removeprefix("managertower."): tensor for name, tensor in model.state_dict().items()}
    original = {}
    vision = {
        "embeddings.class_embedding": "class_embedding",
        "embeddings.patch_embedding.weight": "conv1.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "pre_layrnorm.weight": "ln_pre.weight",
        "pre_layrnorm.bias": "ln_pre.bias",
        "post_layernorm.weight": "ln_post.weight",
        "post_layernorm.bias": "ln_post.bias",
    }
    block = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
    block.update({"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"})
    for name, tensor in state.items():
        if name.startswith("text_model."):
            original["text_transformer." + name.removeprefix("text_model.")] = tensor
        elif name.startswith("vision_model."):
            short = name.removeprefix("vision_model.")
            if short in vision:
                original[V + vision[short]] = tensor
                continue
            parts = short.split(".")  # encoder.layers.{i}.{module...}.{weight|bias}
            layer, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module.endswith("q_proj"):
                    fused = [state[f"vision_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    original[f"{V}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(fused)
            else:
                original[f"{V}transformer.resblocks.{layer}.{block[module]}.{kind}"] = tensor
        elif name.endswith("_layer_embedding.weight"):
            original[f"layer_embeddings_{name.split('_')[0]}.weight"] = tensor
        elif name.startswith("cross_modal_itc_"):
            modality, kind = name.split("_")[3], name.split(".")[-1]
            original[f"{itc_prefix}_{modality}_head.fc.{kind}"] = tensor
        elif name == "itc_temperature":
            original["temperature"] = tensor
        elif "_managers." not in name:
            original[name] = tensor
    for modality in ("text", "image"):
        for layer in range(config.num_hidden_layers):
            ours = f"cross_modal_{modality}_managers.{layer}."
            if model_type == "BT":
                target = (
                    f"cross_modal_{modality}_layernorm."
                    if layer == 0
                    else f"cross_modal_{modality}_link_tower.{layer - 1}.LayerNorm."
                )
                for kind in ("weight", "bias"):
                    original[target + kind] = state[f"{ours}norm.{kind}"]
                continue
            theirs = f"cross_modal_{modality}_manager_tower.{layer}.manager_layer."
            for expert in range(n):
                for kind in ("weight", "bias"):
                    original[f"{theirs}LayerNorm.{expert}.{kind}"] = state[f"{ours}expert_norm.{kind}"][expert]
            if layer > 0:
                for kind in ("weight", "bias"):
                    original[f"{theirs}LayerNorm.{n}.{kind}"] = state[f"{ours}previous_norm.{kind}"]
            original[theirs + "softmax_temperature"] = state[ours + "temperature"]
            width = 1 if weight_type == "scalar" else hidden
            if config.manager_type == "AAUE" and layer > 0:
                original[theirs + "layer_scores_cross"] = state[ours + "previous_scale"][:width].reshape(1, 1, 1, width)
                original[theirs + "linear_controller.weight"] = state[ours + "controller.weight"]
                original[theirs + "linear_controller.bias"] = state[ours + "controller.bias"]
                for part in ("q", "k"):
                    for kind in ("weight", "bias"):
                        original[f"{theirs}fusion_attention.{part}_proj.{kind}"] = state[
                            f"{ours}query_attention.{part}_proj.{kind}"
                        ]
                for kind in ("weight", "bias"):
                    original[f"{theirs}extra_query_LayerNorm.{kind}"] = state[f"{ours}query_norm.{kind}"]
            else:
                rows = [state[ours + "layer_scores"]]
                if layer > 0:
                    rows.append(state[ours + "previous_scale"][None])
                original[theirs + "layer_scores"] = torch.cat(rows)[:, :width][None, :, None, :]
    return {name: tensor.clone() for name, tensor in original.items()}


def save_checkpoint(path, state_dict: dict, config: dict | None) -> None:
    """A checkpoint file as the authors' training writes it (see `lightning_checkpoint`)."""
    torch.save(lightning_checkpoint(state_dict, config), path)


# ----------------------------------------------------------------------------------------------------------------
# The reference: the original forward on the original state dict, in plain torch.


def _linear(sd, prefix, x):
    return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])


def _norm(sd, prefix, x, eps=LN_EPS):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _heads(x, num_heads):
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _bert_attention(sd, prefix, x, context, mask, eps):
    q, k, v = (
        _heads(_linear(sd, f"{prefix}self.{n}", y), HEADS)
        for n, y in (("query", x), ("key", context), ("value", context))
    )
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return _norm(sd, prefix + "output.LayerNorm", _linear(sd, prefix + "output.dense", out) + x, eps)


def _cross_layer(sd, prefix, x, other, mask, other_mask, eps):
    """The original `BertCrossLayer`: self-attention, cross-attention, feed-forward, each post-LayerNorm."""
    x = _bert_attention(sd, prefix + "attention.", x, x, mask, eps)
    x = _bert_attention(sd, prefix + "crossattention.", x, other, other_mask, eps)
    hidden = F.gelu(_linear(sd, prefix + "intermediate.dense", x))
    return _norm(sd, prefix + "output.LayerNorm", _linear(sd, prefix + "output.dense", hidden) + x, eps)


def _text_layers(sd, input_ids, attention_mask):
    """The original text encoder is HF's RobertaModel (`from_pretrained`): every layer's output."""
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=WIDTH // 64,
        intermediate_size=4 * WIDTH,
        max_position_embeddings=40,
        type_vocab_size=1,
        layer_norm_eps=LN_EPS,
    )
    roberta = RobertaModel(config).eval()
    text = {k.removeprefix("text_transformer."): t for k, t in sd.items() if k.startswith("text_transformer.")}
    del text["embeddings.position_ids"]  # a constant this transformers version does not save
    roberta.load_state_dict(text)
    return list(roberta(input_ids, attention_mask, output_hidden_states=True).hidden_states[1:])


def _image_layers(sd, pixel_values):
    """The original CLIP ViT (`clip_model.VisualTransformer`): every block's output after the shared `ln_post`."""
    x = F.conv2d(pixel_values, sd[V + "conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd[V + "class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd[V + "positional_embedding"]
    x = _norm(sd, V + "ln_pre", x)
    outputs = []
    for layer in range(LAYERS):
        block = f"{V}transformer.resblocks.{layer}."
        h = _norm(sd, block + "ln_1", x)
        q, k, v = (
            _heads(t, WIDTH // 64)
            for t in F.linear(h, sd[block + "attn.in_proj_weight"], sd[block + "attn.in_proj_bias"]).chunk(3, -1)
        )
        attended = ((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = x + _linear(sd, block + "attn.out_proj", attended)
        h = _linear(sd, block + "mlp.c_fc", _norm(sd, block + "ln_2", x))
        x = x + _linear(sd, block + "mlp.c_proj", h * torch.sigmoid(1.702 * h))
        outputs.append(_norm(sd, V + "ln_post", x))
    return outputs


def _saue(sd, prefix, experts, previous=None):
    """SAUE: experts (B, N, L, D); softmax over the first N scores, the previous output's score used as is."""
    n = experts.shape[1]
    reps = torch.stack([_norm(sd, f"{prefix}LayerNorm.{i}", experts[:, i]) for i in range(n)], dim=1)
    if previous is not None:
        reps = torch.cat([reps, _norm(sd, f"{prefix}LayerNorm.{n}", previous)[:, None]], dim=1)
    scores = sd[prefix + "layer_scores"]
    weights = torch.cat([torch.softmax(scores[:, :n] / sd[prefix + "softmax_temperature"], dim=1), scores[:, n:]], 1)
    return (weights * reps).sum(dim=1)


def _aaue(sd, prefix, experts, previous, other):
    """AAUE: per-token scores from [attention of LN(previous) over LN(other) ; LN(previous)]."""
    n = experts.shape[1]
    reps = torch.stack([_norm(sd, f"{prefix}LayerNorm.{i}", experts[:, i]) for i in range(n)], dim=1)
    state = _norm(sd, f"{prefix}LayerNorm.{n}", previous)
    query = _norm(sd, prefix + "extra_query_LayerNorm", other)
    q = _linear(sd, prefix + "fusion_attention.q_proj", state)
    k = _linear(sd, prefix + "fusion_attention.k_proj", query)
    readout = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(WIDTH), dim=-1) @ query  # one head, no value projection
    logits = _linear(sd, prefix + "linear_controller", torch.cat([readout, state], dim=-1))  # (B, L, N)
    weights = torch.softmax(logits.transpose(1, 2)[..., None] / sd[prefix + "softmax_temperature"], dim=1)
    return (weights * reps).sum(dim=1) + sd[prefix + "layer_scores_cross"][:, 0] * state


def reference(sd, config, input_ids, attention_mask, pixel_values, image_type=1, previous=None, eps=ORIGINAL_EPS):
    """The original forward; `previous` (per layer, (text, image)) replaces the reference's own previous cross-modal
    outputs when given, to check the managers alone; `eps` is the cross-modal layers' LayerNorm epsilon."""
    bridge = config["model_type"] == "BT"
    n = CROSS if bridge else config["managed_layers_text"]
    text_layers = _text_layers(sd, input_ids, attention_mask)
    image_layers = _image_layers(sd, pixel_values)
    text = _linear(sd, "cross_modal_text_transform", torch.stack(text_layers[-n:], dim=1))
    image = _linear(sd, "cross_modal_image_transform", torch.stack(image_layers[-n:], dim=1))
    text = text + sd["token_type_embeddings.weight"][0]
    image = image + sd["token_type_embeddings.weight"][image_type]
    if not bridge:
        text = text + sd["layer_embeddings_text.weight"][-n:, None]
        image = image + sd["layer_embeddings_image.weight"][-n:, None]
    text_mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    image_mask = torch.zeros(1)
    inputs, outputs = [], []
    x = y = None
    for layer in range(CROSS):
        if previous is not None and layer > 0:
            x, y = previous[layer - 1]
        if bridge:
            prefix = "cross_modal_{}_layernorm" if layer == 0 else f"cross_modal_{{}}_link_tower.{layer - 1}.LayerNorm"
            x_in = _norm(sd, prefix.format("text"), text[:, layer] + (0 if x is None else x))
            y_in = _norm(sd, prefix.format("image"), image[:, layer] + (0 if y is None else y))
        else:
            text_prefix = f"cross_modal_text_manager_tower.{layer}.manager_layer."
            image_prefix = f"cross_modal_image_manager_tower.{layer}.manager_layer."
            if layer > 0 and config["manager_type"] == "AAUE":
                x_in, y_in = _aaue(sd, text_prefix, text, x, y), _aaue(sd, image_prefix, image, y, x)
            else:
                x_in, y_in = _saue(sd, text_prefix, text, x), _saue(sd, image_prefix, image, y)
        inputs.append((x_in, y_in))
        x = _cross_layer(sd, f"cross_modal_text_layers.{layer}.", x_in, y_in, text_mask, image_mask, eps)
        y = _cross_layer(sd, f"cross_modal_image_layers.{layer}.", y_in, x_in, image_mask, text_mask, eps)
        outputs.append((x, y))
    text_pooled = torch.tanh(_linear(sd, "cross_modal_text_pooler.dense", x[:, 0]))
    image_pooled = torch.tanh(_linear(sd, "cross_modal_image_pooler.dense", y[:, 0]))
    pooled = torch.cat([text_pooled, image_pooled], dim=-1)
    return {"inputs": inputs, "outputs": outputs, "pooled": pooled, "text": text_layers[-1], "image": image_layers[-1]}


def _classifier(sd, prefix, x):
    hidden = F.gelu(_norm(sd, prefix + ".1", _linear(sd, prefix + ".0", x)))
    return _linear(sd, prefix + ".3", hidden)


def reference_mlm(sd, text_features, eps=ORIGINAL_EPS):
    hidden = F.gelu(_linear(sd, "mlm_score.transform.dense", text_features))
    hidden = _norm(sd, "mlm_score.transform.LayerNorm", hidden, eps)
    return hidden @ sd["mlm_score.decoder.weight"].T + sd["mlm_score.bias"]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: synthetic original checkpoints and their conversions.


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
    input_ids[:, 0] = 0
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    attention_mask[1, 4:] = 0
    input_ids[1, 4:] = 1  # RoBERTa's pad id
    pixel_values = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator)
    return input_ids, attention_mask, pixel_values


CASES = {
    # name: (model_type, manager_type, weight_type, head)
    "AAUE-pretrain": ("MT", "AAUE", "vector", "pretrain"),
    "SAUE-scalar-pretrain": ("MT", "SAUE", "scalar", "pretrain"),
    "AAUE-vqav2": ("MT", "AAUE", "vector", "vqav2"),
    "SAUE-snli_ve": ("MT", "SAUE", "vector", "snli_ve"),
    "AAUE-nlvr2": ("MT", "AAUE", "vector", "nlvr2"),
    "AAUE-retrieval": ("MT", "AAUE", "vector", "retrieval"),
    "BT-pretrain": ("BT", "bridge", "vector", "pretrain"),
    "BT-retrieval": ("BT", "bridge", "vector", "retrieval"),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per case (built once): the original state dict and config, the converted directory and its class."""
    cache: dict[str, dict] = {}

    def build(case: str) -> dict:
        if case not in cache:
            model_type, manager_type, weight_type, head = CASES[case]
            overrides = {"manager_type": manager_type, "manager_weight_type": weight_type} if model_type == "MT" else {}
            config = hparams(model_type, head, **overrides)
            state = randomise(original_module(config), seed=len(cache)).state_dict()
            root = tmp_path_factory.mktemp(case)
            save_checkpoint(root / "original.ckpt", state, config)
            result = convert_lightning_checkpoint(root / "original.ckpt", root / "hf")
            model_class = ManagerTowerModel if head == "base" else TASK_HEADS[head]
            cache[case] = {"class": model_class, "state": state, "config": config, "root": root, "result": result}
        return cache[case]

    return build


def _converted_model(case: dict):
    return case["class"].from_pretrained(case["root"] / "hf").eval()


def _record_cross_layers(model):
    """Hooks recording the input and output of every cross-modal layer: (text, image) per layer."""
    inputs: dict[tuple[str, int], torch.Tensor] = {}
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for modality in ("text", "image"):
        for index, layer in enumerate(getattr(model, f"cross_modal_{modality}_layers")):

            def pre(module, args, kwargs, key=(modality, index)):
                inputs[key] = args[0]

            def post(module, args, kwargs, output, key=(modality, index)):
                outputs[key] = output[0]

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
    return inputs, outputs, handles


# ----------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("case_name", ["AAUE-pretrain", "SAUE-scalar-pretrain", "BT-pretrain"])
def test_converted_managers_and_heads_equal_the_original_formulas(converted, batch, case_name):
    case = converted(case_name)
    sd, config = case["state"], case["config"]
    assert case["result"].architecture == "ManagerTowerForPreTraining"  # chosen from the loss names mlm + itm
    model = _converted_model(case)
    base = model.managertower
    assert base.config.manager_type == (config["manager_type"] if config["model_type"] == "MT" else "bridge")
    assert base.config.manager_query_mask is False
    assert base.config.cross_modal_layer_norm_eps == ORIGINAL_EPS
    input_ids, attention_mask, pixel_values = batch
    inputs, outputs, handles = _record_cross_layers(base)
    with torch.no_grad():
        fused = base(input_ids, attention_mask, pixel_values)
        mlm_logits = model.mlm_score(fused.text_features)
        itm_logits = model.itm_score(fused.pooler_output)
        got = [(outputs[("text", layer)], outputs[("image", layer)]) for layer in range(CROSS)]
        # The managers alone: the original formulas on the encoders' states and the converted previous outputs.
        managers = reference(sd, config, input_ids, attention_mask, pixel_values, previous=got)
        original = reference(sd, config, input_ids, attention_mask, pixel_values)
    for handle in handles:
        handle.remove()
    for layer in range(CROSS):
        for index, modality in enumerate(("text", "image")):
            expected = managers["inputs"][layer][index]
            torch.testing.assert_close(inputs[(modality, layer)], expected, atol=EXACT_TOL, rtol=EXACT_TOL)
    torch.testing.assert_close(fused.pooler_output, original["pooled"], atol=EXACT_TOL, rtol=EXACT_TOL)
    expected_mlm = reference_mlm(sd, original["outputs"][-1][0])
    torch.testing.assert_close(mlm_logits, expected_mlm, atol=EXACT_TOL, rtol=EXACT_TOL)
    expected_itm = _linear(sd, "itm_score.fc", original["pooled"])
    torch.testing.assert_close(itm_logits, expected_itm, atol=EXACT_TOL, rtol=EXACT_TOL)
    assert not torch.allclose(itm_logits[0], itm_logits[1], atol=1e-3)  # random weights: the samples differ


@pytest.mark.parametrize("case_name", ["AAUE-vqav2", "SAUE-snli_ve", "AAUE-nlvr2", "AAUE-retrieval", "BT-retrieval"])
def test_converted_task_heads_equal_the_original(converted, batch, case_name):
    case = converted(case_name)
    head = CASES[case_name][3]
    assert case["result"].architecture == TASK_HEADS[head].__name__  # chosen from the checkpoint's loss names
    model = _converted_model(case)
    sd, config = case["state"], case["config"]
    assert model.config.cross_modal_layer_norm_eps == ORIGINAL_EPS
    input_ids, attention_mask, pixel_values = batch
    with torch.no_grad():
        if head == "nlvr2":
            assert model.config.num_token_types == 3
            pair = torch.stack([pixel_values, pixel_values.flip(0)], dim=1)
            logits = model(input_ids, attention_mask, pair).logits
            pooled = [
                reference(sd, config, input_ids, attention_mask, pair[:, i], image_type=i + 1)["pooled"]
                for i in range(2)
            ]
            expected = _classifier(sd, "nlvr2_classifier", torch.cat(pooled, dim=-1))
        elif head == "retrieval":
            text = model.managertower.encode_text(input_ids, attention_mask)
            image = model.managertower.encode_image(pixel_values)
            embeddings = (model.text_embeddings(text), model.image_embeddings(image))
            logits = torch.cat([*embeddings, model.itm_logits(text, image)], dim=-1)
            full = reference(sd, config, input_ids, attention_mask, pixel_values)
            itc = "itc" if config["model_type"] == "BT" else "cross_modal_itc"
            expected = torch.cat([
                F.normalize(_linear(sd, f"{itc}_text_head.fc", full["text"][:, 0]), dim=-1),
                F.normalize(_linear(sd, f"{itc}_image_head.fc", full["image"][:, 0]), dim=-1),
                _linear(sd, "itm_score.fc", full["pooled"]),
            ], dim=-1)  # fmt: skip
            assert model.itc_temperature.item() == pytest.approx(sd["temperature"].item())
        else:
            logits = model(input_ids, attention_mask, pixel_values).logits
            pooled = reference(sd, config, input_ids, attention_mask, pixel_values)["pooled"]
            expected = _classifier(sd, {"vqav2": "vqa_classifier", "snli_ve": "snli_classifier"}[head], pooled)
    torch.testing.assert_close(logits, expected, atol=EXACT_TOL, rtol=EXACT_TOL)


@pytest.mark.parametrize("case_name", list(CASES))
def test_round_trip_through_the_original_layout_is_lossless(converted, case_name):
    case = converted(case_name)
    model_type, _, weight_type, head = CASES[case_name]
    itc = "itc" if model_type == "BT" else "cross_modal_itc"
    back = to_original(_converted_model(case), model_type, weight_type, itc_prefix=itc)
    original, n = case["state"], MANAGED if model_type == "MT" else CROSS
    for name, tensor in back.items():
        expected = original[name][-n:] if name.startswith("layer_embeddings_") else original[name]
        assert torch.equal(tensor, expected), name
    # Everything else the original holds is listed as not carried over: CLIP's text-tower leftovers, RoBERTa's
    # pooler and its position-ids buffer, the unused second manager temperatures, heads the class does not hold.
    dropped = set(case["result"].dropped)
    assert dropped == set(original) - set(back)
    assert {
        "text_transformer.embeddings.position_ids",
        "vit_model.positional_embedding",
        "vit_model.ln_final.weight",
        "text_transformer.pooler.dense.weight",
    } <= dropped
    assert ("temperature" in dropped) == (head != "retrieval")


AUTHORS_RUN = Path(__file__).parent / "data" / "managertower_original"


def test_a_checkpoint_written_by_the_authors_code_converts_and_reproduces_their_outputs(tmp_path):
    """`data/managertower_original/make_reference.py` ran the authors' ManagerTower code (torch 1.11, transformers
    4.17, pytorch-lightning 1.5.10) on a tiny AAUE model: their Lightning module saved by their Trainer, and their
    `infer` + heads' outputs on fixed inputs. The conversion must reproduce those outputs."""
    checkpoint = tmp_path / "mt_aaue_pretrain.ckpt"
    checkpoint.write_bytes(lzma.decompress((AUTHORS_RUN / "mt_aaue_pretrain.ckpt.xz").read_bytes()))
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["pytorch-lightning_version"] == "1.5.10" and saved["hparams_name"] == "kwargs"
    assert list(saved["hyper_parameters"]) == ["config"]  # save_hyperparameters() in __init__(self, config)
    assert saved["state_dict"]["text_transformer.embeddings.position_ids"].shape == (1, 40)  # transformers 4.17
    result = convert_lightning_checkpoint(checkpoint, tmp_path / "hf")
    assert result.architecture == "ManagerTowerForPreTraining"
    assert {"text_transformer.embeddings.position_ids", "text_transformer.pooler.dense.weight"} <= set(result.dropped)
    theirs = torch.load(AUTHORS_RUN / "mt_aaue_pretrain_outputs.pt", weights_only=True)
    model = TASK_HEADS["pretrain"].from_pretrained(tmp_path / "hf").eval()
    inputs = (theirs["input_ids"], theirs["attention_mask"], theirs["pixel_values"])
    with torch.no_grad():
        fused = model.managertower(*inputs)
        heads = model(*inputs)
    tolerance = {"atol": 1e-5, "rtol": 0}
    torch.testing.assert_close(fused.text_features, theirs["text_feats"], **tolerance)
    torch.testing.assert_close(fused.pooler_output, theirs["cls_feats"], **tolerance)
    torch.testing.assert_close(heads.mlm_logits, theirs["mlm_logits"], **tolerance)
    torch.testing.assert_close(heads.itm_logits, theirs["itm_logits"], **tolerance)


def test_converted_directory_loads_with_hf_tools(converted):
    case = converted("AAUE-pretrain")
    head, info = TASK_HEADS["pretrain"].from_pretrained(case["root"] / "hf", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    base = ManagerTowerModel.from_pretrained(case["root"] / "hf")  # the fine-tuning recipes' `init_from`
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, head.managertower.state_dict()[name]), name
    assert base.config.num_managed_layers == MANAGED and base.config.text_config.num_attention_heads == WIDTH // 64


def test_bridgetower_converts_to_hf_bridgetower(converted, batch, tmp_path):
    case = converted("BT-pretrain")
    result = convert_lightning_checkpoint(
        case["root"] / "original.ckpt", tmp_path / "hf", output_format="hf-bridgetower"
    )
    assert result.architecture == "BridgeTowerForMaskedLM"
    images = AutoImageProcessor.from_pretrained(tmp_path / "hf")  # HF BridgeTower's own, at the checkpoint's size
    assert type(images) is BridgeTowerImageProcessor and images.size.shortest_edge == IMAGE
    assert "text_transformer.pooler.dense.weight" not in result.dropped  # HF BridgeTower keeps RoBERTa's pooler
    input_ids, attention_mask, pixel_values = batch
    mlm, mlm_info = BridgeTowerForMaskedLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    itm, itm_info = BridgeTowerForImageAndTextRetrieval.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not mlm_info["missing_keys"] and not itm_info["missing_keys"]  # both heads live in the one directory
    eps = mlm.config.layer_norm_eps
    with torch.no_grad():
        full = reference(case["state"], case["config"], input_ids, attention_mask, pixel_values, eps=eps)
        mlm_logits = mlm.eval()(input_ids, attention_mask, pixel_values=pixel_values).logits
        itm_logits = itm.eval()(input_ids, attention_mask, pixel_values=pixel_values).logits
    tolerance = {"atol": EXACT_TOL, "rtol": EXACT_TOL}
    torch.testing.assert_close(mlm_logits, reference_mlm(case["state"], full["outputs"][-1][0], eps), **tolerance)
    torch.testing.assert_close(itm_logits, _linear(case["state"], "itm_score.fc", full["pooled"]), **tolerance)


def test_position_embeddings_resize_to_a_requested_image_size(converted, batch, tmp_path):
    case = converted("AAUE-pretrain")
    result = convert_lightning_checkpoint(case["root"] / "original.ckpt", tmp_path / "hf", head="base", image_size=48)
    assert {"mlm_score.bias", "itm_score.fc.weight"} <= set(result.dropped)  # --head base drops every head
    model = ManagerTowerModel.from_pretrained(tmp_path / "hf")
    assert model.config.vision_config.image_size == 48
    original = case["state"][V + "positional_embedding"]
    grid = original[1:].reshape(1, IMAGE // PATCH, IMAGE // PATCH, WIDTH).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
    expected = torch.cat([original[:1], resized])
    torch.testing.assert_close(model.vision_model.embeddings.position_embedding.weight, expected, atol=1e-6, rtol=0)
    input_ids, attention_mask, _ = batch
    with torch.no_grad():
        assert model(input_ids, attention_mask, torch.randn(BATCH, 3, 48, 48)).image_features.shape[1] == 37


def test_command_line_converts_and_reports_what_it_drops(converted, tmp_path, capsys):
    case = converted("AAUE-vqav2")
    tokenizer_dir = tmp_path / "tokenizer"
    build_tokenizer().save_pretrained(tokenizer_dir)
    main([str(case["root"] / "original.ckpt"), str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)])
    printed = capsys.readouterr().out
    assert "ManagerTowerForVisualQuestionAnswering" in printed and "vit_model.ln_final.weight" in printed
    assert AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == build_tokenizer().get_vocab()
    processor = AutoProcessor.from_pretrained(tmp_path / "out")  # saved with its processor, as evaluated: `albef`
    assert type(processor) is ManagerTowerProcessor
    images = processor.image_processor
    assert (images.size.shortest_edge, images.do_center_crop, images.do_pad) == (IMAGE, False, False)
    assert ManagerTowerConfig.from_pretrained(tmp_path / "out").num_labels == 5  # the hparams' vqav2_label_size
    with pytest.raises(ConversionError, match="destination .* already exists"):
        main([str(case["root"] / "original.ckpt"), str(tmp_path / "out")])


def test_a_checkpoint_without_hyper_parameters_converts_with_them_given(converted, tmp_path):
    case = converted("SAUE-snli_ve")
    save_checkpoint(tmp_path / "bare.ckpt", case["state"], None)
    with pytest.raises(ConversionError, match="no hyper_parameters .* --hparams"):
        convert_lightning_checkpoint(tmp_path / "bare.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "config.json").write_text(json.dumps({"config": case["config"]}))
    result = convert_lightning_checkpoint(tmp_path / "bare.ckpt", tmp_path / "out", hparams=tmp_path / "config.json")
    assert result.architecture == "ManagerTowerForVisualEntailment"


class Arbitrary:
    """Unpickling this needs code from this module: weights_only loading must refuse it."""


def _bad(case: dict, what: str) -> tuple[dict | None, dict | None, dict]:
    """(state dict, config, convert kwargs) for a bad checkpoint; None state = a file that is not a checkpoint."""
    state, config = dict(case["state"]), dict(case["config"])
    kwargs: dict = {}
    if what == "unknown model type":
        config["model_type"] = "METER"
    elif what == "unknown manager type":
        config["manager_type"] = "XAUE"
    elif what == "unknown loss name":
        config["loss_names"] = {**config["loss_names"], "caption": 1}
    elif what == "missing tensor":
        del state["cross_modal_image_manager_tower.1.manager_layer.linear_controller.weight"]
    elif what == "shape that does not fit":
        state["cross_modal_text_transform.weight"] = state["cross_modal_text_transform.weight"][:, :64]
    elif what == "hparams that do not fit the weights":
        config.update(managed_layers_text=3, managed_layers_image=3)
    elif what == "unexpected tensor":
        state["cross_modal_text_link_tower.0.LayerNorm.weight"] = torch.ones(WIDTH)
    elif what == "altered position ids":
        state["text_transformer.embeddings.position_ids"] = torch.arange(40).flip(0)[None]
    elif what == "unknown eval transform":
        config["val_transform_keys"] = ["pixelbert"]
    elif what == "bert text encoder":
        config["tokenizer"] = "bert-base-uncased"
    elif what == "separate vit layernorms":
        config["vit_layernorm_shared"] = False
    elif what == "several tasks":
        config["loss_names"] = {**config["loss_names"], "snli": 1}
    elif what == "arbitrary code":
        config["load_path"] = Arbitrary()
    elif what == "not a checkpoint":
        state = None
    elif what == "hf-bridgetower of a ManagerTower":
        kwargs["output_format"] = "hf-bridgetower"
    return state, config, kwargs


BAD = {
    "unknown model type": "model_type 'METER' cannot be converted",
    "unknown manager type": "unknown manager_type 'XAUE'",
    "unknown loss name": r"unknown loss names \['caption'\]",
    "missing tensor": r"missing tensors .*linear_controller\.weight",
    "shape that does not fit": r"cross_modal_text_transform\.weight gives .* of shape \(128, 64\).* needs \(128, 128\)",
    "hparams that do not fit the weights": r"layer_scores has shape \(1, 2, 1, 128\), expected \(1, 3, 1, 128\)",
    "unexpected tensor": r"unexpected tensors .*cross_modal_text_link_tower\.0\.LayerNorm\.weight",
    "altered position ids": r"text_transformer\.embeddings\.position_ids of shape \(1, 40\) does not hold 0, 1",
    "unknown eval transform": r"val_transform_keys \['pixelbert'\]: no ManagerTowerProcessor equivalent",
    "bert text encoder": "only RoBERTa text encoders convert",
    "separate vit layernorms": "vit_layernorm_shared=False has no ManagerTower equivalent",
    "several tasks": r"several tasks .* choose one with --head",
    "arbitrary code": "would need arbitrary code to load",
    "not a checkpoint": "is not a PyTorch checkpoint",
    "hf-bridgetower of a ManagerTower": "takes BridgeTower checkpoints",
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_checkpoints_fail_clearly_and_write_nothing(converted, tmp_path, what):
    state, config, kwargs = _bad(converted("AAUE-vqav2"), what)
    path = tmp_path / "bad.ckpt"
    if state is None:
        path.write_bytes(b"this is not a checkpoint")
    else:
        save_checkpoint(path, state, config)
    with pytest.raises(ConversionError, match=BAD[what]):
        convert_lightning_checkpoint(path, tmp_path / "out", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]  # no destination, no staging leftovers


def test_hf_bridgetower_has_no_task_classifier_heads(converted, tmp_path):
    case = converted("BT-pretrain")
    with pytest.raises(ConversionError, match="HF BridgeTower has no 'vqav2' head"):
        convert_lightning_checkpoint(
            case["root"] / "original.ckpt", tmp_path / "out", head="vqav2", output_format="hf-bridgetower"
        )
    assert not (tmp_path / "out").exists()
