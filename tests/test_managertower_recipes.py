"""ManagerTower data (arrow and json readers, collation), recipes, and every recipe run from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from manager_plugin.managertower.tiny import build_tokenizer
from training.managertower.cli import main
from training.managertower.collators import TaskCollator, mask_tokens, vqa_targets
from training.managertower.datasets import TaskDataset
from training.managertower.readers import open_image, read_records
from training.managertower.recipe import RecipeError, load_recipe, parse_overrides, recipe_names
from training.managertower.run import deepspeed_config
from training.managertower.synthetic import write_synthetic
from training.managertower.transforms import build_transform

pytestmark = pytest.mark.usefixtures("single_thread")  # the tiny model is fastest on one thread

TASKS = ("pretrain", "vqav2", "snli_ve", "nlvr2", "retrieval")
EXPECTED_METRICS = {
    "pretrain": {"mlm_accuracy", "itm_accuracy"},
    "vqav2": {"vqa_score"},
    "snli_ve": {"accuracy"},
    "nlvr2": {"accuracy"},
    "flickr30k": {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "tr_mean", "ir_mean", "r_mean", "rsum"},
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("task", TASKS)
def test_arrow_and_json_readers_read_the_same_samples(task, tmp_path):
    root = write_synthetic(task, tmp_path, num_images=3)
    arrow = read_records("arrow", root, [f"{task}_train"], task)
    records = read_records("json", root, [f"{task}_train.json"], task)
    assert len(arrow) == len(records) > 3
    assert arrow.texts() == records.texts() == [records[i]["text"] for i in range(len(records))]
    for index in range(len(arrow)):
        ours, theirs = arrow[index], records[index]
        for key in set(ours) - {"image", "images"}:
            assert ours[key] == theirs[key], (index, key)
        pairs = zip(ours.get("images", [ours.get("image")]), theirs.get("images", [theirs.get("image")]))
        for from_arrow, from_json in pairs:
            assert np.array_equal(np.asarray(open_image(from_arrow)), np.asarray(open_image(from_json)))
    if task == "retrieval":
        assert arrow.image_ids().tolist() == [0, 0, 1, 1, 2, 2]


def test_arrow_reader_errors_name_the_problem(tmp_path):
    write_synthetic("vqav2", tmp_path, num_images=2)
    with pytest.raises(FileNotFoundError, match="no table vqav2_missing.arrow"):
        read_records("arrow", tmp_path, ["vqav2_missing"], "vqav2")
    with pytest.raises(ValueError, match="no 'caption' column"):
        read_records("arrow", tmp_path, ["vqav2_train"], "retrieval")


def test_vqa_targets_are_dense_soft_scores():
    samples = [{"labels": [2, 0], "scores": [0.6, 0.3]}, {"labels": [], "scores": []}, {"labels": [3], "scores": [1.0]}]
    expected = torch.tensor([[0.3, 0, 0.6, 0], [0, 0, 0, 0], [0, 0, 0, 1.0]])
    torch.testing.assert_close(vqa_targets(samples, 4), expected)
    with pytest.raises(ValueError, match="answer label 3 out of range: the head has 3 answers"):
        vqa_targets(samples, 3)


def test_pretraining_batches_mask_text_and_draw_false_images(tmp_path, tokenizer):
    root = write_synthetic("pretrain", tmp_path, num_images=4)
    dataset = TaskDataset(
        read_records("arrow", root, ["pretrain_train"], "pretrain"), build_transform("clip", 32), True
    )
    torch.manual_seed(0)
    batch = TaskCollator(tokenizer, "pretrain", max_text_len=16, mlm_probability=0.5)([dataset[i] for i in range(8)])
    assert batch["input_ids"].shape == batch["mlm_input_ids"].shape == (8, 16)
    assert batch["pixel_values"].shape == batch["false_pixel_values"].shape == (8, 3, 32, 32)
    masked = batch["mlm_labels"] != -100
    assert masked.any()
    assert torch.equal(batch["mlm_labels"][masked], batch["input_ids"][masked])
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert not (masked & special).any()
    changed = batch["mlm_input_ids"] != batch["input_ids"]
    assert not (changed & ~masked).any()
    assert (batch["mlm_input_ids"][masked] == tokenizer.mask_token_id).any()


def test_a_samples_mask_and_false_image_follow_the_sample_and_epoch_not_the_batch(tmp_path, tokenizer):
    """What makes 2 ranks draw as one process: a sample's MLM mask and false image are the same in any batch, at any
    position, whatever the process generator's state; the next epoch draws new ones."""
    root = write_synthetic("pretrain", tmp_path, num_images=4)  # 8 captions
    records = read_records("arrow", root, ["pretrain_train"], "pretrain")
    dataset = TaskDataset(records, build_transform("square", 32), false_image=True, seed=3)
    collate = TaskCollator(tokenizer, "pretrain", max_text_len=16, mlm_probability=0.5)
    torch.manual_seed(0)
    whole = collate([dataset[i] for i in range(8)])
    torch.manual_seed(1)
    order = [5, 1, 6, 0, 2, 3, 4, 7]
    parts = [collate([dataset[i] for i in order[:3]]), collate([dataset[i] for i in order[3:]])]
    for key in ("mlm_input_ids", "mlm_labels", "false_pixel_values"):
        assert torch.equal(torch.cat([part[key] for part in parts]), whole[key][order]), key
    assert (whole["mlm_labels"] != -100).any()
    dataset.set_epoch(1)
    assert not torch.equal(collate([dataset[i] for i in range(8)])["mlm_labels"], whole["mlm_labels"])


def test_masking_draws_bert_proportions():
    """15% of the maskable tokens chosen; of those 80% masked, 10% random, 10% kept; nothing else touched."""
    ids = torch.randint(10, 1000, (400, 50), generator=torch.Generator().manual_seed(0))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :5] = False
    masked, labels = mask_tokens(ids, maskable, 4, 1000, 0.15, torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert not chosen[:, :5].any() and torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert chosen[:, 5:].float().mean().item() == pytest.approx(0.15, abs=0.01)  # 18,000 tokens: 3 sigma = 0.008
    as_mask = (masked[chosen] == 4).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()  # 10% kept, plus random draws of the same id (0.1%)
    assert as_mask == pytest.approx(0.8, abs=0.025) and kept == pytest.approx(0.1, abs=0.02)


def test_recipes_load_and_reject_bad_values():
    assert recipe_names() == sorted(EXPECTED_METRICS)
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe.optim["lr_multipliers"]["cross_modal"] == 5
    vqa = load_recipe("vqav2")
    assert vqa.optim["lr_multipliers"]["vqa_classifier"] == 50 and vqa.model["head"]["num_labels"] == 3129
    overrides = parse_overrides(["training.learning_rate=2e-5", "model.config.manager_type=SAUE"])
    assert overrides == {"training": {"learning_rate": 2e-5}, "model": {"config": {"manager_type": "SAUE"}}}
    assert vqa.with_overrides(overrides).training["learning_rate"] == 2e-5
    with pytest.raises(RecipeError, match="data.format 'parquet'"):
        vqa.with_overrides({"data": {"format": "parquet"}})
    with pytest.raises(RecipeError, match=r"unknown data keys \['images'\]"):
        vqa.with_overrides({"data": {"images": "x"}})
    with pytest.raises(RecipeError, match="is not KEY=VALUE"):
        parse_overrides(["training.max_steps"])
    with pytest.raises(RecipeError, match="no recipe 'vqa3'"):
        load_recipe("vqa3")
    assert deepspeed_config("zero2").endswith("training/deepspeed/zero2.json")
    with pytest.raises(FileNotFoundError, match="no DeepSpeed config at /nowhere.json"):
        deepspeed_config("/nowhere.json")


@pytest.mark.parametrize("name", sorted(EXPECTED_METRICS))
def test_every_recipe_runs_a_few_steps_from_the_command_line(name, tmp_path):
    metrics = main(["--recipe", name, "--output-dir", str(tmp_path), "--synthetic", "--max-steps", "2"])
    assert set(metrics) == EXPECTED_METRICS[name]
    assert all(np.isfinite(value) for value in metrics.values())
    assert json.loads((tmp_path / "eval_metrics.json").read_text()) == metrics
    assert (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()


def test_pretrain_then_finetune_from_its_checkpoint_then_evaluate_it(tmp_path):
    """JSON data; NLVR2 starts from the pre-training checkpoint at a larger image size (position table resized, a
    third token type added); `--eval-only` on the saved NLVR2 checkpoint reproduces the run's metrics."""
    main(["--recipe", "pretrain", "--output-dir", str(tmp_path / "pt"), "--synthetic", "--max-steps", "1",
          "--set", "data.format=json"])  # fmt: skip
    common = ["--recipe", "nlvr2", "--synthetic", "--set", "data.image_size=48", "--set", "data.format=json"]
    trained = main(
        [*common, "--output-dir", str(tmp_path / "nlvr2"), "--max-steps", "1", "--model", str(tmp_path / "pt")]
    )
    config = json.loads((tmp_path / "nlvr2" / "config.json").read_text())
    assert config["num_token_types"] == 3 and config["vision_config"]["image_size"] == 48
    # Saved with the processor it is evaluated with: the recipe's `square` eval transform at 48 px.
    images = AutoProcessor.from_pretrained(tmp_path / "nlvr2").image_processor
    assert (images.size.shortest_edge, images.do_center_crop, images.do_pad) == (48, False, False)
    assert AutoProcessor.from_pretrained(tmp_path / "pt").image_processor.do_center_crop  # pre-training: `clip`
    reloaded = main(
        [*common, "--output-dir", str(tmp_path / "eval"), "--eval-only", "--model", str(tmp_path / "nlvr2")]
    )
    assert reloaded == trained
