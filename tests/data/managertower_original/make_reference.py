"""Run the authors' ManagerTower code on CPU: a tiny checkpoint saved by their Lightning module and PyTorch-Lightning
1.5.10's own `save_checkpoint`, and their model's outputs on fixed inputs, for `tests/test_managertower_convert.py`.

Their code is not part of this repository: pass a checkout of LooperXX/ManagerTower with --code. Run it in a separate
environment with their pins (Python 3.8, torch 1.11.0, transformers 4.17.0, pytorch-lightning 1.5.10, torchmetrics
0.7.2, einops); timm and tensorboard, which the CLIP path never uses, are stubbed at import. Weights are random on a
1/64 grid, so the checkpoint compresses (xz) to a few hundred KB.

    python make_reference.py --code /tmp/ManagerTower --out tests/data/managertower_original
"""

from __future__ import annotations

import argparse
import importlib.machinery
import lzma
import os
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

WIDTH, LAYERS, CROSS, IMAGE, PATCH, VOCAB, MAX_TEXT = 64, 2, 2, 32, 8, 100, 40
BATCH, LENGTH = 3, 7


def stub_unused_imports() -> None:
    """timm (their Swin/ViT paths) and tensorboard (a Lightning logger) are imported but never used here."""

    class Anything(types.ModuleType):
        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return lambda *args, **kwargs: args[0] if args and callable(args[0]) else None

    import transformers  # noqa: F401  (before the stubs: it looks for timm once, at import)

    for name in (
        "timm",
        "timm.data",
        "timm.models",
        "timm.models.helpers",
        "timm.models.layers",
        "timm.models.registry",
        "timm.models.vision_transformer",
        "timm.models.resnet",
        "timm.models.resnetv2",
        "timm.models.features",
        "timm.models.hub",
        "torch.utils.tensorboard",
        "torch.utils.tensorboard.summary",
    ):
        module = Anything(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module


def tiny_clip(path: Path) -> None:
    """A TorchScript archive with the keys OpenAI's CLIP files hold, as their `build_model` loads them."""
    shapes = {
        "visual.conv1.weight": (WIDTH, 3, PATCH, PATCH),
        "visual.class_embedding": (WIDTH,),
        "visual.positional_embedding": ((IMAGE // PATCH) ** 2 + 1, WIDTH),
        "visual.ln_pre.weight": (WIDTH,),
        "visual.ln_pre.bias": (WIDTH,),
        "visual.ln_post.weight": (WIDTH,),
        "visual.ln_post.bias": (WIDTH,),
        "visual.proj": (WIDTH, 32),
        "text_projection": (WIDTH, 32),
        "positional_embedding": (8, WIDTH),
        "token_embedding.weight": (VOCAB, WIDTH),
        "ln_final.weight": (WIDTH,),
        "ln_final.bias": (WIDTH,),
    }
    for prefix in [f"visual.transformer.resblocks.{i}." for i in range(LAYERS)] + ["transformer.resblocks.0."]:
        shapes.update(
            {
                prefix + "attn.in_proj_weight": (3 * WIDTH, WIDTH),
                prefix + "attn.in_proj_bias": (3 * WIDTH,),
                prefix + "attn.out_proj.weight": (WIDTH, WIDTH),
                prefix + "attn.out_proj.bias": (WIDTH,),
                prefix + "ln_1.weight": (WIDTH,),
                prefix + "ln_1.bias": (WIDTH,),
                prefix + "mlp.c_fc.weight": (4 * WIDTH, WIDTH),
                prefix + "mlp.c_fc.bias": (4 * WIDTH,),
                prefix + "mlp.c_proj.weight": (WIDTH, 4 * WIDTH),
                prefix + "mlp.c_proj.bias": (WIDTH,),
                prefix + "ln_2.weight": (WIDTH,),
                prefix + "ln_2.bias": (WIDTH,),
            }
        )

    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for name, shape in shapes.items():
        *parents, leaf = name.split(".")
        module = root
        for parent in parents:
            if not hasattr(module, parent):
                setattr(module, parent, Holder())
            module = getattr(module, parent)
        module.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
    torch.jit.script(root).save(str(path))


def tiny_roberta(path: Path) -> None:
    """A RoBERTa directory as `RobertaModel.from_pretrained` reads it (transformers 4.17)."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=1,
        intermediate_size=WIDTH,
        max_position_embeddings=MAX_TEXT,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
    )  # as roberta-base's config
    RobertaModel(config).save_pretrained(path)


def sacred_config(vit: str, tokenizer: str) -> dict:
    """Their `src/config.py` defaults with the `mt`, `text_roberta`-like and pre-training settings, tiny sizes."""
    losses = dict.fromkeys(("itm", "mlm", "itc", "itm_itc", "irtr_itm_itc", "vqa", "nlvr2", "irtr", "snli"), 0)
    losses.update(mlm=1, itm=1)
    return {
        "root_dir": "~/MT",
        "data_root": "~/MT/dataset/pre-train",
        "log_dir": "~/MT/logs",
        "output_dir": "~/MT/checkpoints",
        "load_path": "",
        "num_gpus": 1,
        "num_nodes": 1,
        "num_workers": 0,
        "precision": 32,
        "per_gpu_batchsize": BATCH,
        "per_gpu_eval_batchsize": BATCH,
        "exp_name": "MT",
        "group_name": "mlm_itm",
        "run_name": "pre-train",
        "resume_from": None,
        "fast_dev_run": False,
        "val_check_interval": 1.0,
        "test_only": False,
        "log_every_n_steps": 50,
        "seed": 0,
        "datasets": ["coco", "vg", "sbu", "gcc"],
        "loss_names": losses,
        "batch_size": 4096,
        "train_transform_keys": ["clip"],
        "val_transform_keys": ["clip"],
        "image_size": IMAGE,
        "patch_size": PATCH,
        "draw_false_image": 1,
        "image_only": False,
        "resolution_before": 224,
        "vqav2_label_size": 3129,
        "max_text_len": MAX_TEXT,
        "tokenizer": tokenizer,
        "vocab_size": VOCAB,
        "whole_word_masking": True,
        "mlm_prob": 0.15,
        "draw_false_text": 0,
        "input_image_embed_size": WIDTH,
        "input_text_embed_size": WIDTH,
        "vit": vit,
        "hidden_size": WIDTH,
        "num_heads": 2,
        "num_layers": CROSS,
        "mlp_ratio": 1,
        "drop_rate": 0.1,
        "optim_type": "adamw",
        "learning_rate": 1e-5,
        "weight_decay": 0.01,
        "decay_power": 1,
        "max_epoch": 10,
        "max_steps": 100000,
        "warmup_steps": 0.1,
        "end_lr": 0,
        "lr_mult_head": 5,
        "lr_mult_cross_modal": 5,
        "get_recall_metric": False,
        "debug_num": 0,
        "meter_fusion": False,
        "vit_remove_last": False,
        "model_type": "MT",
        "vit_layernorm_shared": True,
        "vit_layernorm_init_from_vit": False,
        "task_head_layers": 2,
        "head_hidden_scale": 1,
        "per_gpu_eval_batchsize_text": 256,
        "per_gpu_eval_batchsize_image": 128,
        "per_gpu_eval_batchsize_fusion_text": 500,
        "k_test": 128,
        "amp_flag": True,
        "task_threshold": 0,
        "nlvr2_drop_rate": 0.1,
        "temperature": 0.07,
        "contrastive_hidden_size": 256,
        "gather_all_inputs": False,
        "gather_global_negative": False,
        "gather_all_image_inputs": False,
        "image_chunks": 1,
        "text_chunks": 1,
        "save_memory": False,
        "manager_type": "AAUE",
        "managed_layers_text": LAYERS,
        "managed_layers_image": LAYERS,
        "manager_learnable": True,
        "manager_weight_type": "vector",
        "manager_softmax_temperature": 1,
        "manager_softmax_temperature_learnable": True,
    }


def randomise(model: nn.Module) -> None:
    """Every parameter random on a 1/64 grid (LayerNorm gains near 1, temperatures positive)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith(("temperature", "temperature_cross")):
                value = 0.5 + noise.abs().clamp(max=1.5)
            elif name.endswith(".weight") and parameter.dim() == 1:
                value = 1 + 0.2 * noise  # LayerNorm gains
            elif parameter.dim() <= 1 or "layer_scores" in name:
                value = 0.2 * noise
            else:
                value = noise / parameter[0].numel() ** 0.5
            parameter.copy_(torch.round(value * 64) / 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", required=True, help="a checkout of LooperXX/ManagerTower")
    parser.add_argument("--out", required=True, help="where to write the checkpoint and the outputs")
    args = parser.parse_args()
    stub_unused_imports()
    sys.path.insert(0, str(Path(args.code).resolve()))
    import pytorch_lightning as pl
    from src.modules.mt_module import MTTransformer

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        vit, tokenizer = "CLIP-ViT-tiny.pt", "tiny-roberta"
        tiny_clip(Path(scratch) / vit)
        tiny_roberta(Path(scratch) / tokenizer)
        os.chdir(scratch)  # the config names the encoders by relative path, so the files do not depend on it
        config = sacred_config(vit, tokenizer)
        pl.seed_everything(0)
        model = MTTransformer(config)
        randomise(model)
        model.eval()
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_epochs=1)
        trainer.training_type_plugin.connect(model)
        model.trainer = trainer
        checkpoint = Path(scratch) / "mt_aaue_pretrain.ckpt"
        trainer.save_checkpoint(str(checkpoint))
        (out / "mt_aaue_pretrain.ckpt.xz").write_bytes(lzma.compress(checkpoint.read_bytes()))

    generator = torch.Generator().manual_seed(0)
    text_ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
    text_ids[:, 0] = 0
    text_masks = torch.ones(BATCH, LENGTH, dtype=torch.long)
    text_masks[1, 4:] = 0
    text_ids[1, 4:] = 1  # RoBERTa's pad id
    pixels = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator)
    with torch.no_grad():
        infer = model.infer({"text_ids": text_ids, "text_masks": text_masks, "image": [pixels]})
        outputs = {
            "input_ids": text_ids,
            "attention_mask": text_masks,
            "pixel_values": pixels,
            "text_feats": infer["text_feats"],
            "cls_feats": infer["cls_feats"],
            "mlm_logits": model.mlm_score(infer["text_feats"]),
            "itm_logits": model.itm_score(infer["cls_feats"]),
        }
    torch.save(outputs, out / "mt_aaue_pretrain_outputs.pt")
    print(f"wrote {out}: " + ", ".join(f"{p.name} ({p.stat().st_size // 1024} KB)" for p in sorted(out.iterdir())))


if __name__ == "__main__":
    main()
