"""Model setup for a stage: parts trained or frozen, per-part optimizer groups, LoRA kept off the base LLM, managers
carried through or applied, AnyRes pinpoints; and the checkpoint helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import random_image
from transformers import AutoProcessor

from llava_integration import apply_manager, load_model, manager_of, prepare_inputs
from manager_plugin import ManagerConfig
from training.arguments import resolve_stage
from training.checkpoint import lora_scalings, manager_weights, merged_lora_state_dict, publish_files, replace_dir
from training.ds_config import SHIPPED, resolve_deepspeed
from training.model_setup import (
    apply_lora,
    configure_images,
    configure_processor,
    ensure_manager,
    load_stage_model,
    part_rules,
    set_trainable,
)
from training.optim import GroupRule, param_groups
from training.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("single_thread")  # the tiny model is fastest on one thread

# Independent of training.model_setup.PARTS: where each part lives in HF's LLaVA-OneVision.
PREFIXES = {
    "vision_tower": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.", "model.image_newline"),
    "manager": ("model.manager.",),
    "language_model": ("model.language_model.", "lm_head."),
}


def part_by_prefix(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return next(part for part, prefixes in PREFIXES.items() if name.startswith(prefixes))


@pytest.mark.parametrize("name", ["stage1", "stage1_manager", "stage2_manager", "stage1.5_nogrid"])
def test_exactly_the_recipe_parts_train_with_their_learning_rates(tiny_dir, name):
    recipe = load_recipe(name)
    model = load_stage_model(str(tiny_dir), recipe)
    for parameter_name, parameter in model.named_parameters():
        assert parameter.requires_grad == (part_by_prefix(parameter_name) in recipe.trainable), parameter_name
    groups = param_groups(model, part_rules(recipe, recipe.learning_rate), recipe.learning_rate)
    assert {g["name"] for g in groups} == set(recipe.trainable)
    for group in groups:
        assert group["lr"] == pytest.approx(recipe.part_learning_rate(group["name"]))
        assert all(
            part_by_prefix(n) == group["name"]
            for n, p in model.named_parameters()
            if any(p is q for q in group["params"])
        )
    overridden = param_groups(model, part_rules(recipe, 2e-3, {"projector": 7e-4}), 2e-3)
    assert {g["name"]: g["lr"] for g in overridden}["projector"] == pytest.approx(7e-4)


def test_param_groups_are_generic_and_split_decay():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    rules = [GroupRule("head", ("0.",), 5.0), GroupRule("rest")]
    groups = param_groups(model, rules, 1e-3, weight_decay=0.1, decay_names={"0.weight"})
    summary = sorted((g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in groups)
    assert summary == [("head", 5e-3, 0.0, 1), ("head", 5e-3, 0.1, 1), ("rest", 1e-3, 0.0, 2)]
    with pytest.raises(ValueError, match="matches no group"):
        param_groups(model, [GroupRule("head", ("0.",))], 1e-3)


def test_lora_leaves_the_base_llm_frozen_and_trains_manager_and_projector_in_full(tiny_dir):
    recipe = load_recipe("stage2_manager")
    model = load_stage_model(str(tiny_dir), recipe, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(".language_model.layers." in n for n in lora)
    assert {part_by_prefix(n) for n in trainable - lora} == {"vision_tower", "projector", "manager"}
    assert not any(part_by_prefix(n) == "language_model" for n in trainable - lora)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    processor = AutoProcessor.from_pretrained(tiny_dir)
    configure_processor(processor, recipe, recipe.image_aspect_ratio)
    text = "<image>What colour is the shape? red"
    batch = prepare_inputs(processor, [text], [[random_image(40, 80)]], recipe.image_aspect_ratio)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen_llm = {n for n in before if part_by_prefix(n) == "language_model" and "lora_" not in n}
    assert frozen_llm and not changed & frozen_llm
    assert any("manager" in n for n in changed) and any("multi_modal_projector" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_merged_lora_state_dict_equals_peft_merge(tiny_dir):
    model = load_model(tiny_dir, dtype=torch.float32)
    apply_manager(model, ManagerConfig())
    peft_model = apply_lora(model, ("projector", "manager", "language_model"), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    merged = merged_lora_state_dict(peft_model.state_dict(), lora_scalings(peft_model))
    reference = peft_model.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for key, tensor in reference.items():
        torch.testing.assert_close(merged[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    assert set(manager_weights(merged)) == set(manager_of(model).state_dict())


def test_manager_is_applied_carried_or_refused(tiny_dir, tmp_path):
    stage1 = load_recipe("stage1_manager")
    model = load_model(tiny_dir, dtype=torch.float32)
    configure_images(model, stage1)
    ensure_manager(model, stage1, "tiny", {"manager_type": "adaptive_cross", "jitter": 0.0})
    assert manager_of(model).config.manager_type == "adaptive_cross" and manager_of(model).config.jitter == 0.0
    with torch.no_grad():
        for parameter in manager_of(model).parameters():
            parameter.normal_()
    model.save_pretrained(tmp_path / "ckpt")

    carried = load_model(tmp_path / "ckpt", dtype=torch.float32)
    ensure_manager(carried, load_recipe("stage1.5_manager"), "ckpt")
    for key, tensor in manager_of(model).state_dict().items():
        assert torch.equal(manager_of(carried).state_dict()[key], tensor)
    with pytest.raises(ValueError, match="options {'manager_type': 'static'} contradict"):
        ensure_manager(carried, load_recipe("stage1.5_manager"), "ckpt", {"manager_type": "static"})
    with pytest.raises(ValueError, match="recipe stage1.5 trains the baseline .* holds a manager"):
        ensure_manager(carried, load_recipe("stage1.5"), "ckpt")


def test_anyres_pinpoints_follow_the_recipe_in_tower_units(tiny_dir):
    recipe = load_recipe("stage1.5")
    model = load_model(tiny_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    configure_images(model, recipe)
    configure_processor(processor, recipe, recipe.image_aspect_ratio)
    expected = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    assert model.config.image_grid_pinpoints == expected == processor.image_processor.image_grid_pinpoints
    assert model.config.vision_aspect_ratio == "anyres_max_9"
    # A 1:3 image now gets a 1x3 grid: base view + 3 crops.
    inputs = prepare_inputs(processor, ["<image>"], [[random_image(30, 90)]], "anyres_max_9")
    assert inputs["pixel_values"].shape[1] == 4
    configure_images(model, load_recipe("stage2_nogrid"))
    assert model.config.vision_aspect_ratio == "square"


def test_set_trainable_rejects_unknown_parts(tiny_model):
    with pytest.raises(ValueError, match=r"unknown parts \['eyes'\]"):
        set_trainable(tiny_model, ("projector", "eyes"))


def test_replace_and_publish_never_show_a_partial_directory(tmp_path, monkeypatch):
    final = tmp_path / "checkpoint-3"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = tmp_path / ".partial-checkpoint-3"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    replace_dir(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and not staging.exists()

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    staging = tmp_path / "staged"
    staging.mkdir()
    for name in ("config.json", "model.safetensors", "manager.safetensors"):
        (staging / name).write_text(name)
    moved = []
    real_replace = os.replace

    def record(source, target):
        moved.append((os.path.basename(source), (out / "config.json").exists()))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", record)
    publish_files(staging, out)
    assert moved[-1] == ("config.json", False)  # the old config went first, the new one comes last
    assert all(not config_present for _, config_present in moved)
    assert (out / "config.json").read_text() == "config.json"


def test_arguments_come_from_the_recipe_then_the_command_line(tmp_path):
    (tmp_path / "m").mkdir()  # the model and data paths must exist (checked before anything loads)
    (tmp_path / "d.json").write_text("[]")
    base = {
        "recipe": "stage2_manager",
        "model_name_or_path": str(tmp_path / "m"),
        "data_path": str(tmp_path / "d.json"),
    }
    base["output_dir"] = str(tmp_path / "out")
    setup = resolve_stage({**base, "global_batch_size": 8, "per_device_train_batch_size": 2})
    training = setup.training
    assert training.gradient_accumulation_steps == 4  # 8 = 2 per device x 1 process x 4
    assert training.learning_rate == 1e-5 and training.lr_scheduler_type == "cosine" and training.warmup_steps == 0.03
    assert training.bf16 is torch.cuda.is_available() and not training.remove_unused_columns
    assert setup.model_max_length == 16384 and setup.group_by_modality_length
    explicit = resolve_stage({**base, "gradient_accumulation_steps": 3, "learning_rate": 2e-5, "model_max_length": 64})
    assert explicit.training.gradient_accumulation_steps == 3 and explicit.training.learning_rate == 2e-5
    assert explicit.model_max_length == 64
    with pytest.raises(ValueError, match="global batch 6 is not a multiple of per_device_train_batch_size 4"):
        resolve_stage({**base, "global_batch_size": 6, "per_device_train_batch_size": 4})
    with pytest.raises(ValueError, match=r"unknown arguments \['learning_rat'\]"):
        resolve_stage({**base, "learning_rat": 1.0})
    with pytest.raises(ValueError, match=r"missing required arguments \['output_dir'\]"):
        resolve_stage({key: value for key, value in base.items() if key != "output_dir"})


def test_deepspeed_names_resolve_to_the_shipped_configs(tmp_path):
    assert set(SHIPPED) == {"zero2", "zero3"}
    for name in ("zero2", "zero3"):
        config = json.loads(Path(resolve_deepspeed(name)).read_text())
        assert config["zero_optimization"]["stage"] == int(name[-1])
        assert "optimizer" not in config and "scheduler" not in config  # our param groups and cosine schedule rule
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert resolve_deepspeed(str(own)) == str(own) and resolve_deepspeed(None) is None
    with pytest.raises(ValueError, match=r"--deepspeed 'zero4': expected one of \['zero2', 'zero3'\]"):
        resolve_deepspeed("zero4")
