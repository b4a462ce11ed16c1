"""ManagerTower task heads, retrieval metrics and re-ranking, and the learning-rate multipliers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from manager_plugin.managertower import (
    TASK_HEADS,
    ManagerTowerForImageTextRetrieval,
    ManagerTowerForNLVR2,
    ManagerTowerForPreTraining,
    ManagerTowerModel,
    UnimodalEncoding,
    recall_at_k,
    rerank_scores,
)
from manager_plugin.managertower.heads import half_matched_labels, sample_hard_negatives
from manager_plugin.managertower.retrieval import top_k_candidates
from manager_plugin.managertower.tiny import tiny_config
from training.managertower.optim import parameter_groups

pytestmark = pytest.mark.usefixtures("single_thread")  # the tiny model is fastest on one thread

VOCAB, BATCH, LENGTH = 100, 4, 7


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return ManagerTowerModel(tiny_config(VOCAB))


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    attention_mask[1, 4:] = 0
    input_ids[1, 4:] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(BATCH, 3, 32, 32, generator=generator),
    }


def _task_inputs(task: str, inputs: dict) -> dict:
    generator = torch.Generator().manual_seed(1)
    if task == "pretrain":
        labels = torch.where(torch.rand(BATCH, LENGTH, generator=generator) < 0.3, inputs["input_ids"], -100)
        labels[0, 1] = inputs["input_ids"][0, 1]  # at least one masked token
        return {
            **inputs,
            "mlm_input_ids": inputs["input_ids"],
            "mlm_labels": labels,
            "false_pixel_values": torch.randn(BATCH, 3, 32, 32, generator=generator),
        }
    if task == "vqav2":
        return {**inputs, "labels": torch.rand(BATCH, 5, generator=generator)}
    if task == "snli_ve":
        return {**inputs, "labels": torch.tensor([0, 1, 2, 1])}
    if task == "nlvr2":
        return {
            **inputs,
            "pixel_values": torch.randn(BATCH, 2, 3, 32, 32, generator=generator),
            "labels": torch.tensor([0, 1, 1, 0]),
        }
    return {**inputs, "image_ids": torch.tensor([0, 0, 1, 2])}


@pytest.mark.parametrize("task", sorted(TASK_HEADS))
def test_each_head_loss_runs_forward_and_backward(task, base, inputs):
    model = TASK_HEADS[task].from_base_model(base, num_labels=5).train()
    torch.testing.assert_close(
        model.managertower.cross_modal_text_transform.weight, base.cross_modal_text_transform.weight
    )
    output = model(**_task_inputs(task, inputs))
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    output.loss.backward()
    head_and_managers = [
        name
        for name, parameter in model.named_parameters()
        if not name.startswith("managertower.") or "_managers." in name
    ]
    missing = [name for name in head_and_managers if model.get_parameter(name).grad is None]
    assert not missing, missing


def test_vqa_loss_is_bce_summed_over_answers(base, inputs):
    model = TASK_HEADS["vqav2"].from_base_model(base, num_labels=5).eval()
    targets = torch.rand(BATCH, 5)
    with torch.no_grad():
        output = model(**inputs, labels=targets)
    expected = F.binary_cross_entropy_with_logits(output.logits, targets, reduction="sum") / BATCH
    torch.testing.assert_close(output.loss, expected)


def test_pretraining_itm_uses_the_false_image_where_the_label_is_zero(base, inputs):
    model = ManagerTowerForPreTraining.from_base_model(base).eval()
    false_pixels = torch.randn(BATCH, 3, 32, 32)
    labels = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        output = model(**inputs, false_pixel_values=false_pixels, itm_labels=labels)
        true_pooled = model.managertower(
            inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
        ).pooler_output
        false_pooled = model.managertower(inputs["input_ids"], inputs["attention_mask"], false_pixels).pooler_output
    expected = torch.where(labels[:, None].bool(), model.itm_score(true_pooled), model.itm_score(false_pooled))
    torch.testing.assert_close(output.itm_logits, expected, atol=1e-5, rtol=0)
    assert set(output.losses) == {"itm"}
    sampled = half_matched_labels(7, torch.device("cpu"))
    assert sampled.sum().item() == 3 and set(sampled.tolist()) == {0, 1}


def test_nlvr2_adds_a_second_image_type_copied_from_the_first(base, inputs):
    model = ManagerTowerForNLVR2.from_base_model(base).eval()
    types = model.managertower.token_type_embeddings.weight
    assert model.config.num_token_types == 3 and base.config.num_token_types == 2
    torch.testing.assert_close(types[2], types[1])
    pixels = torch.randn(BATCH, 2, 3, 32, 32)
    with torch.no_grad():
        before = model(inputs["input_ids"], inputs["attention_mask"], pixels).logits
        types[2].add_(torch.randn(types.shape[1]))  # the right image is fused with token type 2
        after = model(inputs["input_ids"], inputs["attention_mask"], pixels).logits
    assert (before - after).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"shape \(B, 2, C, H, W\)"):
        model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])


def test_hard_negatives_are_never_positives_and_follow_the_similarities():
    torch.manual_seed(0)
    logits = torch.tensor([[5.0, 0.0, 30.0, 0.0], [5.0, 5.0, 0.0, 30.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    image_ids = torch.tensor([0, 0, 1, 2])
    positives = image_ids[:, None] == image_ids[None, :]
    draws = torch.stack([sample_hard_negatives(logits, positives) for _ in range(50)])
    assert not positives[torch.arange(4).expand(50, 4), draws].any()
    assert (draws[:, 0] == 2).all() and (draws[:, 1] == 3).all()  # the overwhelmingly similar negative


def test_recall_at_k_on_a_known_ranking():
    # 3 images, 6 captions, two per image: text t describes image t // 2.
    scores = torch.tensor(
        [
            [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # image 0 ranks t0 first (its own)
            [8.5, 8.0, 2.5, 7.0, 2.0, 3.0],  # image 1 ranks t0, t1, then t3 (its own) third
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # image 2 ranks t5 first (its own)
        ]
    )
    # Per text, its image's rank among the 3 images: t0 1, t1 3, t2 2, t3 1, t4 1, t5 1.
    metrics = recall_at_k(scores, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2]), ks=(1, 2, 3))
    expected = {
        "tr_r1": 200 / 3,
        "tr_r2": 200 / 3,
        "tr_r3": 100.0,
        "ir_r1": 400 / 6,
        "ir_r2": 500 / 6,
        "ir_r3": 100.0,
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
    assert metrics["tr_mean"] == pytest.approx((200 / 3 + 200 / 3 + 100) / 3)
    assert metrics["ir_mean"] == pytest.approx((400 / 6 + 500 / 6 + 100) / 3)
    assert metrics["r_mean"] == pytest.approx((metrics["tr_mean"] + metrics["ir_mean"]) / 2)
    assert metrics["rsum"] == pytest.approx(sum(expected.values()))


def test_top_k_candidates_unite_both_directions():
    itc = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.2]])
    # Each image's best text: (0, 0) and (1, 0); each text's best image: (0, 0), (1, 1), (1, 2).
    expected = torch.tensor([[True, False, False], [True, True, True]])
    assert torch.equal(top_k_candidates(itc, 1), expected)


def test_rerank_scores_itm_on_candidates_only(base, inputs):
    model = ManagerTowerForImageTextRetrieval.from_base_model(base).eval()
    with torch.no_grad():
        texts = model.managertower.encode_text(inputs["input_ids"], inputs["attention_mask"])
        images = model.managertower.encode_image(inputs["pixel_values"][:3])
        scores = rerank_scores(model, texts, images, k=1, batch_size=2)
        itc = model.image_embeddings(images) @ model.text_embeddings(texts).t()
        candidates = top_k_candidates(itc, 1)
        for image, text in candidates.nonzero().tolist():
            pair_text = UnimodalEncoding(
                experts=texts.experts[text : text + 1], attention_mask=texts.attention_mask[text : text + 1]
            )
            pair_image = UnimodalEncoding(
                experts=images.experts[image : image + 1], attention_mask=images.attention_mask[image : image + 1]
            )
            expected = model.itm_logits(pair_text, pair_image)[0, 1]
            torch.testing.assert_close(scores[image, text], expected, atol=1e-5, rtol=0)
    assert torch.isinf(scores[~candidates]).all() and torch.isfinite(scores[candidates]).all()


def test_parameter_groups_apply_the_recipe_multipliers(base):
    model = TASK_HEADS["vqav2"].from_base_model(base, num_labels=5)
    groups = parameter_groups(model, 1e-5, 0.01, {"vqa_classifier": 50, "cross_modal": 5}, ["bias", "norm.weight"])
    by_parameter = {id(parameter): group for group in groups for parameter in group["params"]}
    named = dict(model.named_parameters())
    assert len(by_parameter) == len(named)

    def group_of(name):
        return by_parameter[id(named[name])]

    assert group_of("vqa_classifier.0.weight")["lr"] == pytest.approx(5e-4)
    assert group_of("managertower.cross_modal_text_managers.1.controller.weight")["lr"] == pytest.approx(5e-5)
    assert group_of("managertower.cross_modal_image_layers.0.attention.self.query.weight")["weight_decay"] == 0.01
    assert group_of("managertower.cross_modal_image_layers.0.attention.self.query.bias")["weight_decay"] == 0.0
    assert group_of("managertower.text_model.encoder.layer.0.output.dense.weight")["lr"] == pytest.approx(1e-5)
    assert group_of("managertower.cross_modal_text_managers.0.expert_norm.weight")["weight_decay"] == 0.0
