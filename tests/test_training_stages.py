"""Every recipe end to end from the command line, chained stage 1 -> 1.5 -> 2 in all four ablation arms, on the tiny
model and a fixed tiny synthetic set; and the LoRA variant."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from llava_integration import QUERY_MASK_KWARG, load_manager, load_model, manager_of
from manager_plugin.provenance import environment_provenance
from training.cli import main
from training.recipe import load_recipe
from training.synthetic import write_synthetic

pytestmark = pytest.mark.usefixtures("single_thread")  # the tiny model is fastest on one thread

# Each stage after stage 1 starts from the output of the recipe it names (`starts_from`).
CHAIN = [
    "stage1", "stage1_manager",
    "stage1.5", "stage1.5_nogrid", "stage1.5_manager", "stage1.5_manager_nogrid",
    "stage2", "stage2_nogrid", "stage2_manager", "stage2_manager_nogrid",
]  # fmt: skip
STEPS = 3
PARTS = {
    "vision_tower": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.", "model.image_newline"),
    "manager": ("model.manager.",),
    "language_model": ("model.language_model.", "lm_head."),
}


def part_by_prefix(name: str) -> str:
    return next(part for part, prefixes in PARTS.items() if name.startswith(prefixes))


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """The parameters of a saved model as `load_model` restores them (the file's key layout is HF's business)."""
    return load_model(directory, dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A fixed tiny set: 4 captions for stage 1; 2 single-image, 1 two-image and 1 text-only record for later stages."""
    directory = tmp_path_factory.mktemp("data")
    write_synthetic(directory, seed=1, num_scenes=8)
    captions = json.loads((directory / "captions.json").read_text())[:4]
    mixed = json.loads((directory / "qa.json").read_text())[:2] + json.loads((directory / "multi.json").read_text())[:1]
    mixed += [json.loads((directory / "text.jsonl").read_text().splitlines()[0])]
    (directory / "fixed_captions.json").write_text(json.dumps(captions))
    (directory / "fixed_mixed.json").write_text(json.dumps(mixed))
    return directory


def tiny_args(data: Path, recipe: str, model: Path, output: Path, *extra: str) -> list[str]:
    fixed = "fixed_captions.json" if load_recipe(recipe).template == "plain" else "fixed_mixed.json"
    return [
        "--recipe", recipe, "--model_name_or_path", str(model), "--data_path", str(data / fixed),
        "--image_folder", str(data), "--output_dir", str(output),
        "--global_batch_size", "4", "--per_device_train_batch_size", "2", "--max_steps", str(STEPS),
        "--warmup_steps", "0", "--gradient_checkpointing", "false", "--report_to", "none", "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def chain(tiny_dir, data, tmp_path_factory):
    """Run the ten recipes in order; each later stage starts from the output of the recipe it names."""
    root = tmp_path_factory.mktemp("chain")
    runs = {}
    for name in CHAIN:
        previous = load_recipe(name).starts_from
        model = Path(tiny_dir) if previous is None else root / previous
        runs[name] = (model, root / name, main(tiny_args(data, name, model, root / name)))
    return runs


def test_every_recipe_trains_a_few_steps_with_finite_decreasing_loss(chain):
    for name, (_, output, result) in chain.items():
        assert result.global_step == STEPS, name
        assert len(result.losses) == STEPS and all(math.isfinite(loss) for loss in result.losses), name
        assert result.losses[-1] < result.losses[0], (name, result.losses)
        assert (output / "config.json").is_file() and (output / "trainer_state.json").is_file()
        assert not [p for p in output.iterdir() if p.name.startswith(".partial")], name


def test_exactly_the_recipe_parts_change_at_their_learning_rates(chain):
    for name, (model, output, result) in chain.items():
        recipe = load_recipe(name)
        logged = {
            key.removeprefix("lr/"): value for key, value in result.log_history[0].items() if key.startswith("lr/")
        }
        assert set(logged) == set(recipe.trainable), name
        for part, rate in logged.items():
            assert rate == pytest.approx(recipe.part_learning_rate(part)), (name, part)  # no warmup: step 1 at peak
        before, after = weights(model), weights(output)
        changed = {
            part_by_prefix(key)
            for key, tensor in after.items()
            if key in before and not torch.equal(tensor, before[key])
        }
        had_manager = any(key.startswith("model.manager.") for key in before)
        assert changed == set(recipe.trainable) - (set() if had_manager else {"manager"}), name
        assert any(key.startswith("model.manager.") for key in after) == ("manager" in recipe.trainable), name


def test_the_manager_is_carried_through_the_stages(chain, tiny_dir):
    root = chain["stage1_manager"][1].parent
    stage1 = manager_of(load_model(root / "stage1_manager"))
    for name in ("stage1.5_manager", "stage2_manager", "stage1.5_manager_nogrid", "stage2_manager_nogrid"):
        later = manager_of(load_model(root / name))
        assert later is not None and later.config == stage1.config, name
    # Carried, not re-created: stage 2 trained stage 1.5's weights a little (manager lr 5e-5, 3 steps) from where
    # stage 1 left them (lr 1e-3) instead of starting again from the zero-initialised weights.
    w1 = manager_of(load_model(root / "stage1_manager")).managers[1].layer_weights
    w15 = manager_of(load_model(root / "stage1.5_manager")).managers[1].layer_weights
    w2 = manager_of(load_model(root / "stage2_manager")).managers[1].layer_weights
    assert w1.abs().max() > 1e-3
    assert (w2 - w15).abs().max() < 3e-4 and (w15 - w1).abs().max() < 3e-4
    assert not torch.equal(w2, w15)
    for name in ("stage1", "stage1.5", "stage2_nogrid"):
        assert manager_of(load_model(root / name)) is None, name
    # The output is also a manager adapter for the base model.
    adapted = load_manager(load_model(tiny_dir), root / "stage2_manager")
    torch.testing.assert_close(manager_of(adapted).managers[1].layer_weights, w2)


def test_grid_and_square_settings_are_saved_with_each_stage(chain):
    root = chain["stage2"][1].parent
    grid = load_model(root / "stage2").config
    assert grid.vision_aspect_ratio == "anyres_max_9"
    assert sorted(grid.image_grid_pinpoints) == sorted([[32 * r, 32 * c] for r in range(1, 7) for c in range(1, 7)])
    assert load_model(root / "stage1.5").config.image_grid_pinpoints == [
        [32, 64],
        [64, 32],
        [64, 64],
        [96, 32],
        [32, 96],
    ]
    for name in ("stage1", "stage2_nogrid", "stage2_manager_nogrid"):
        assert load_model(root / name).config.vision_aspect_ratio == "square", name


def test_each_stage_records_how_it_was_made(chain):
    for name, (model, output, _) in chain.items():
        recorded = json.loads((output / "provenance.json").read_text())
        assert recorded["stage"]["recipe"] == name and recorded["stage"]["model_name_or_path"] == str(model)
        assert recorded["global_step"] == STEPS and recorded["world_size"] == 1 and recorded["deepspeed"] is None
        assert recorded["project"] == environment_provenance()["project"]
        assert recorded["libraries"]["transformers"] == transformers.__version__


def test_lora_variant_saves_a_merged_model_and_reloads(chain, data, tmp_path):
    start = chain["stage1.5_manager"][1]
    lora = (
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--gradient_checkpointing",
        "true",
    )  # frozen embeddings + checkpointing
    result = main(tiny_args(data, "stage2_manager", start, tmp_path / "lora", *lora))
    assert result.global_step == STEPS and all(math.isfinite(loss) for loss in result.losses)
    assert not any("lora" in key for key in load_file(tmp_path / "lora" / "model.safetensors"))  # merged: plain HF
    before, after = weights(start), weights(tmp_path / "lora")
    assert set(before) == set(after)
    llm_linear = [k for k in after if ".layers." in k and "language_model" in k and k.endswith("proj.weight")]
    assert llm_linear and all(not torch.equal(after[k], before[k]) for k in llm_linear)  # LoRA merged in
    frozen = [k for k in after if part_by_prefix(k) == "language_model" and k not in llm_linear]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # base LLM otherwise untouched
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("model.manager."))
    assert manager_of(load_model(tmp_path / "lora")) is not None
    assert (tmp_path / "lora" / "trainable.safetensors").is_file()  # unmerged LoRA + full-trained parts, to resume


def test_adaptive_query_manager_gets_the_instruction_as_its_query(tiny_dir, data, tmp_path, monkeypatch):
    import training.data.collator as collator_module

    seen = []
    real_call = collator_module.TrainingCollator.__call__

    def spy(self, features):
        batch = real_call(self, features)
        seen.append(batch.get(QUERY_MASK_KWARG))
        return batch

    monkeypatch.setattr(collator_module.TrainingCollator, "__call__", spy)
    query = ("--manager_type", "adaptive_cross", "--manager_lr", "1e-2")
    result = main(tiny_args(data, "stage2_manager", Path(tiny_dir), tmp_path / "cross", *query))
    assert all(math.isfinite(loss) for loss in result.losses)
    assert seen and all(mask is not None for mask in seen) and any(bool(mask.any()) for mask in seen)
    assert manager_of(load_model(tmp_path / "cross")).config.manager_type == "adaptive_cross"
