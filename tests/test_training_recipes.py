"""The recipes against the paper's training table (REFERENCE.md section 1), and the scripts that launch them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from training import cli
from training.recipe import RECIPE_DIR, RecipeError, load_recipe, recipe_names

SCRIPTS = Path(__file__).resolve().parents[1] / "llava_manager" / "scripts"
ALL_PARTS = {"vision_tower", "projector", "manager", "language_model"}
# REFERENCE.md, training recipe: stage 1 projector (+ manager) at 1e-3 (manager 1e-3), max len 8192, square,
# plain prompt, LLaVA-Pretrain 558k; stages 1.5 / 2 every part at 1e-5, vision 2e-6, manager 5e-5, max len 16384,
# Qwen ChatML; global batch 512, cosine, warmup 3%, 1 epoch, bf16, gradient checkpointing in every stage.
PAPER = {
    "1": {
        "lr": 1e-3,
        "vision": None,
        "manager": 1e-3,
        "max_len": 8192,
        "template": "plain",
        "data": "blip_laion_cc_sbu_558k",
    },
    "1.5": {"lr": 1e-5, "vision": 2e-6, "manager": 5e-5, "max_len": 16384, "template": "chat", "data": "ReCap-558K"},
    "2": {
        "lr": 1e-5,
        "vision": 2e-6,
        "manager": 5e-5,
        "max_len": 16384,
        "template": "chat",
        "data": "LLaVA-OneVision-Data",
    },
}
STAGE15_PINPOINTS = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
EXPECTED = {
    "stage1", "stage1_manager", "stage1.5", "stage1.5_manager", "stage1.5_nogrid", "stage1.5_manager_nogrid",
    "stage2", "stage2_manager", "stage2_nogrid", "stage2_manager_nogrid",
}  # fmt: skip


def test_the_ten_recipes_exist():
    assert set(recipe_names()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_agrees_with_the_paper_table(name):
    recipe = load_recipe(name)
    stage = name.split("_")[0].removeprefix("stage")
    paper = PAPER[stage]
    manager, grid = "_manager" in name, stage != "1" and "nogrid" not in name
    assert recipe.stage == stage
    assert recipe.global_batch_size == 512
    assert recipe.model_max_length == paper["max_len"]
    assert recipe.template == paper["template"]
    assert paper["data"] in recipe.data
    training = recipe.training
    assert training["learning_rate"] == paper["lr"]
    assert training["lr_scheduler_type"] == "cosine" and training["warmup_steps"] == 0.03
    assert training["num_train_epochs"] == 1 and training["bf16"] and training["activation_checkpointing"]
    assert training["weight_decay"] == 0.0
    # Every stage saves periodically (stage 1 is ~1090 steps at 512 a batch): a crash loses at most a few hundred.
    assert training["save_strategy"] == "steps" and training["save_steps"] <= 200 and training["save_total_limit"] >= 1

    trainable = set(recipe.trainable)
    if stage == "1":
        assert trainable == ({"projector", "manager"} if manager else {"projector"})
    else:
        assert trainable == (ALL_PARTS if manager else ALL_PARTS - {"manager"})
        assert recipe.part_learning_rate("vision_tower") == paper["vision"]
        assert recipe.part_learning_rate("projector") == recipe.part_learning_rate("language_model") == paper["lr"]
    if manager:
        assert recipe.part_learning_rate("manager") == paper["manager"]
        assert recipe.manager["manager_type"] == "static" and recipe.manager["grid_type"] == "all"
        assert recipe.manager["vision_layers"] is None  # resolves to the top half: 13..25 on LLaVA-OV-0.5B
    else:
        assert recipe.manager is None

    assert (recipe.image_aspect_ratio == "anyres_max_9") == grid
    assert (recipe.image_aspect_ratio == "square") == (not grid)
    if grid:
        expected = (
            STAGE15_PINPOINTS if stage == "1.5" else [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]
        )
        assert sorted(recipe.grid_pinpoints(384)) == sorted(expected)
        assert recipe.grid_pinpoints(32)[0] == [p // 12 for p in recipe.grid_pinpoints(384)[0]]  # tiny: 32 px crops


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stages_chain_within_one_ablation_arm(name):
    """Stage 1 is shared by the grid and no-grid arms; later stages start from the same arm's previous stage."""
    recipe = load_recipe(name)
    if recipe.stage == "1":
        assert recipe.starts_from is None
        return
    previous = load_recipe(recipe.starts_from)
    assert (previous.manager is None) == (recipe.manager is None)
    if previous.stage != "1":
        assert previous.image_aspect_ratio == recipe.image_aspect_ratio
    assert {"1.5": "1", "2": "1.5"}[recipe.stage] == previous.stage


def test_invalid_recipes_are_named_with_the_problem(tmp_path):
    source = (RECIPE_DIR / "stage1_manager.yaml").read_text()
    cases = {
        "trainable: [projector, manager]": ("trainable: [projector, eyes]", "trainable"),
        "template: plain": ("template: fancy", "template 'fancy'"),
        "grid_shapes: null": ("grid_shapes: [[1, 2]]", "grid_shapes must be given exactly for AnyRes"),
        "learning_rates: {manager: 1.0e-3}": ("learning_rates: {vision_tower: 1.0e-3}", "keys must be trainable parts"),
        "  num_train_epochs: 1": ("  num_train_epoch: 1", r"\['num_train_epoch'\].*not TrainingArguments fields"),
        "manager_type: static": ("manager_type: clever", "unknown manager_type 'clever'"),
    }
    for original, (replacement, message) in cases.items():
        path = tmp_path / "broken.yaml"
        assert original in source
        path.write_text(source.replace(original, replacement))
        with pytest.raises((RecipeError, ValueError), match=message):
            load_recipe(path)
    with pytest.raises(RecipeError, match="unknown recipe 'stage3'"):
        load_recipe("stage3")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_recipe_has_a_thin_launch_script(name):
    script = SCRIPTS / f"{name}.sh"
    text = script.read_text()
    assert re.search(rf"\bRECIPE={re.escape(name)}\b", text)
    previous = re.search(r"\bPREVIOUS=(\S+)", text)
    assert (previous.group(1) if previous else None) == load_recipe(name).starts_from
    assert len(text.splitlines()) <= 6 and "stage_launch.sh" in text
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0


def test_launcher_takes_cluster_settings_from_the_environment():
    text = (SCRIPTS / "stage_launch.sh").read_text()
    for variable in (
        "NNODES",
        "NPROC_PER_NODE",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "MODEL",
        "DATA",
        "IMAGES",
        "OUTPUT",
        "DEEPSPEED",
    ):
        assert f"${{{variable}" in text, variable
    assert "-m llava_manager train" in text and "torch.distributed.run" in text
    assert (
        subprocess.run(["bash", "-n", str(SCRIPTS / "stage_launch.sh")], capture_output=True, check=False).returncode
        == 0
    )


def test_help_lists_the_recipes_and_the_training_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in EXPECTED:
        assert f"\n  {name} " in text, name
    for option in ("--recipe", "--model_name_or_path", "--data_path", "--image_folder", "--deepspeed", "--max_steps",
                   "--resume_from_checkpoint", "--lora_r", "--on_bad_data"):  # fmt: skip
        assert option in text, option
