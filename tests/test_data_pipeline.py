"""Templates, labels, query masks, the collator (image-token expansion, truncation, dummy image) and the sampler."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image
from transformers import AutoProcessor

from llava_integration import QUERY_MASK_KWARG, prepare_inputs, set_image_aspect_ratio
from training.data import (
    IGNORE_INDEX,
    ModalityLengthGroupedSampler,
    Record,
    TrainingCollator,
    chatml_assistant_mask,
    get_template,
    image_token_counts,
)
from training.model_setup import configure_processor
from training.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("single_thread")  # the tiny model is fastest on one thread

QUESTION = "What colour is the shape? Answer with a single word."


@pytest.fixture
def processor(tiny_dir):
    """A fresh processor per test: training sets its padding side, pinpoints and aspect ratio."""
    return AutoProcessor.from_pretrained(tiny_dir)


def record(images=("a.png",), turns=(("human", f"<image>\n{QUESTION}"), ("gpt", "red")), id_="r") -> Record:
    return Record(id=id_, images=tuple(images), turns=tuple(turns), source="data.json", index=0)


def feature(template: str, rec: Record, processor, images) -> dict:
    encoded = get_template(template).encode(rec, processor)
    return {
        "where": rec.where,
        "text": encoded.text,
        "input_ids": encoded.input_ids,
        "target_mask": encoded.target_mask,
        "query_mask": encoded.query_mask,
        "images": images,
    }


def test_plain_template_trains_on_the_caption_only(processor):
    caption = "The image shows a red circle on the left."
    encoded = get_template("plain").encode(record(turns=(("human", "<image>\nDescribe."), ("gpt", caption))), processor)
    assert encoded.text == "<image>" + caption + "\n"
    assert processor.tokenizer.decode(encoded.input_ids[encoded.target_mask]) == caption + "\n"
    assert not encoded.query_mask.any()


def test_chat_template_labels_assistant_turns_by_generation_blocks_and_by_chatml_pattern(processor):
    rec = record(turns=(("human", f"<image>\n{QUESTION}"), ("gpt", "red"), ("human", "Where is it?"), ("gpt", "left")))
    encoded = get_template("chat").encode(rec, processor)
    tokenizer = processor.tokenizer
    assert tokenizer.decode(encoded.input_ids[encoded.target_mask]) == "red<|im_end|>left<|im_end|>"
    # The fallback for chat templates without {% generation %}: the same tokens.
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    pattern = chatml_assistant_mask(encoded.input_ids, header, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert torch.equal(pattern, encoded.target_mask)
    # A template without generation blocks takes the fallback path and gets the same labels.
    processor.chat_template = processor.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    plain_template = get_template("chat").encode(rec, processor)
    assert torch.equal(plain_template.input_ids, encoded.input_ids)
    assert torch.equal(plain_template.target_mask, encoded.target_mask)


def test_query_mask_is_the_instruction_of_the_user_turn_holding_the_image(processor):
    rec = record(turns=(("human", f"<image>\n{QUESTION}"), ("gpt", "red"), ("human", "Where is it?"), ("gpt", "left")))
    encoded = get_template("chat").encode(rec, processor)
    assert processor.tokenizer.decode(encoded.input_ids[encoded.query_mask]) == QUESTION
    text_only = get_template("chat").encode(record(images=(), turns=(("human", QUESTION), ("gpt", "red"))), processor)
    assert not text_only.query_mask.any()


def test_a_record_without_placeholder_gets_its_images_before_the_first_user_turn(processor):
    encoded = get_template("chat").encode(record(turns=(("human", QUESTION), ("gpt", "red"))), processor)
    assert f"<|im_start|>user\n<image>\n{QUESTION}" in encoded.text


@pytest.mark.parametrize("recipe", ["stage2_manager", "stage2_manager_nogrid"])
def test_collator_matches_prepare_inputs_and_labels_only_the_answers(tiny_dir, processor, recipe):
    loaded = load_recipe(recipe)
    configure_processor(processor, loaded, loaded.image_aspect_ratio)
    aspect = load_recipe(recipe).image_aspect_ratio
    images = [[random_image(40, 90, 0)], [random_image(64, 32, 1), random_image(32, 32, 2)], []]
    recs = [
        record(),
        record(images=("a", "b"), turns=(("human", f"<image>\n<image>\n{QUESTION}"), ("gpt", "blue"))),
        record(images=(), turns=(("human", QUESTION), ("gpt", "green"))),
    ]
    features = [feature("chat", r, processor, i) for r, i in zip(recs, images, strict=True)]
    batch = TrainingCollator(processor, aspect, 4096, with_query_mask=True)(features)

    reference = prepare_inputs(processor, [f["text"] for f in features], images, aspect, padding=True)
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    tokenizer = processor.tokenizer
    for row, answer in enumerate(["red", "blue", "green"]):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == answer + "<|im_end|>"
        assert tokenizer.decode(batch["input_ids"][row][batch[QUERY_MASK_KWARG][row]]) == (QUESTION if row < 2 else "")


@pytest.mark.parametrize("aspect", ["square", "anyres_max_9"])
def test_image_token_counts_match_the_processor(processor, aspect):
    sizes = [(32, 32), (40, 90), (90, 40), (100, 100), (20, 200)]
    for size in sizes:
        inputs = prepare_inputs(processor, ["<image>"], [[random_image(*size)]], aspect)
        assert image_token_counts(processor, [size], aspect) == [
            int((inputs["input_ids"] == processor.image_token_id).sum())
        ]
    two = prepare_inputs(processor, ["<image><image>"], [[random_image(40, 90), random_image(64, 64)]], aspect)
    assert sum(image_token_counts(processor, [(40, 90), (64, 64)], aspect)) == int(
        (two["input_ids"] == processor.image_token_id).sum()
    )


def test_dummy_image_changes_neither_loss_nor_gradients_but_runs_the_vision_path(tiny_model, processor):
    """A text-only batch gets a dummy image so all ranks run the same modules (ZeRO-3); it must be inert."""
    model = set_image_aspect_ratio(tiny_model, "square").train()
    texts = [record(images=(), turns=(("human", QUESTION), ("gpt", c))) for c in ("red", "a blue circle")]
    features = [feature("chat", r, processor, []) for r in texts]
    with_dummy = TrainingCollator(processor, "square", 4096, ensure_image=True)(features)
    without = TrainingCollator(processor, "square", 4096, ensure_image=False)(features)
    assert "pixel_values" in with_dummy and "pixel_values" not in without

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_dummy, grads_dummy = loss_and_grads(with_dummy)
    loss_plain, grads_plain = loss_and_grads(without)
    torch.testing.assert_close(loss_dummy, loss_plain, rtol=1e-6, atol=1e-6)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_dummy[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    vision = [n for n in grads_dummy if "vision_tower" in n or "multi_modal_projector" in n]
    assert vision and all(grads_dummy[n].abs().max() == 0 for n in vision)


def test_truncation_cuts_text_after_the_last_image_only(processor):
    long_question = " ".join(["What colour is the shape?"] * 12)
    rec = record(turns=(("human", f"<image>\n{long_question}"), ("gpt", "red")))
    features = [feature("chat", rec, processor, [random_image(32, 32)])]
    full = TrainingCollator(processor, "square", 4096)(features)
    limit = int(full["input_ids"].shape[1]) - 10
    cut = TrainingCollator(processor, "square", limit)(features)
    assert cut["input_ids"].shape[1] == limit
    assert torch.equal(cut["input_ids"], full["input_ids"][:, :limit])
    image_end = int((full["input_ids"][0] == processor.image_token_id).nonzero().max()) + 1
    with pytest.raises(RuntimeError, match="record 'r'.*beyond model_max_length"):
        TrainingCollator(processor, "square", image_end - 1)(features)


def test_sampler_groups_by_modality_and_length_and_is_a_seeded_permutation():
    lengths = [10, -5, 30, 20, -8, 40, -1, 12, 7, -3, 25, 9]  # negative: text-only
    sampler = ModalityLengthGroupedSampler(lengths, group_size=4, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    groups = [order[i : i + 4] for i in range(0, len(order), 4)]
    full_groups = [g for g in groups if len(g) == 4]
    mixed = [g for g in full_groups if len({lengths[i] > 0 for i in g}) > 1]
    assert len(mixed) <= 1  # only the leftovers of both modalities share a group
    for group in groups:
        assert [abs(lengths[i]) for i in group] == sorted((abs(lengths[i]) for i in group), reverse=True)
    assert list(ModalityLengthGroupedSampler(lengths, 4, seed=3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(len(lengths)))
    plain = list(ModalityLengthGroupedSampler(lengths, 4, seed=3, group_by_modality_length=False))
    assert plain == torch.randperm(len(lengths), generator=torch.Generator().manual_seed(3)).tolist()
