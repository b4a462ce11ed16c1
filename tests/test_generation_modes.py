"""Every generation mode with a manager (tiny model, fp32, CPU): greedy, seeded sampling, beam search and chunked
prefill, for static and adaptive (instruction-query) managers on padded batches of grid and square images.

The instruction reaches the prefill as the query through the same first-forward hook the lmms-eval model uses; it is
not chunk-aware, so chunked prefill is tested with per-token managers only."""

from __future__ import annotations

import pytest
import torch
from test_llava_integration import make_inputs, randomise_managers, set_aspect

from eval.model import _on_prefill
from llava_integration import QUERY_MASK_KWARG, apply_manager, instruction_query_mask
from manager_plugin import ManagerConfig

NEW_TOKENS = 4
BEAMS = 3
SAMPLES = {  # padded batches: the two prompts differ in length
    "anyres_max_9": [[(100, 150)], [(40, 100)]],
    "square": [[(100, 150)], [(30, 90)]],
}
MODES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "temperature": 0.8, "top_k": 0},
    "beam": {
        "do_sample": False,
        "num_beams": BEAMS,
        "num_return_sequences": BEAMS,
        "length_penalty": 1.0,
        "output_scores": True,
    },
    "chunked": {"do_sample": False, "prefill_chunk_size": 9},  # cuts through the system prompt and the images
}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    return None


def batch(model, processor, aspect):
    set_aspect(model, aspect)
    inputs = make_inputs(processor, aspect, SAMPLES[aspect])
    query = instruction_query_mask(inputs["input_ids"], processor.tokenizer, inputs["attention_mask"])
    return inputs, query


def generate(model, processor, inputs, query, seed=0, **mode):
    """`generate` of exactly NEW_TOKENS tokens (never an image placeholder), with the instruction as query."""
    tokenizer = processor.tokenizer
    if query is not None and mode.get("num_beams", 1) > 1:
        query = query.repeat_interleave(mode["num_beams"], dim=0)
    torch.manual_seed(seed)
    with torch.no_grad(), _on_prefill(model, QUERY_MASK_KWARG, query):
        return model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            suppress_tokens=[model.config.image_token_id, model.config.video_token_id],
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            **mode,
        )


def assert_same_output(actual, expected, exact=True):
    assert torch.equal(actual.sequences, expected.sequences)
    compare = torch.equal if exact else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert all(compare(a, b) for a, b in zip(actual.logits, expected.logits, strict=True))
    if getattr(expected, "sequences_scores", None) is not None:
        assert compare(actual.sequences_scores, expected.sequences_scores)


# Grid images with both managers; square images (no grid, no newline tokens) with the static one.
CASES = [("static", "anyres_max_9"), ("adaptive_last", "anyres_max_9"), ("static", "square")]


# adaptive_last reads the whole instruction: a chunk of the prompt cannot be given its query (see the module doc).
EVERY_MODE = [
    (manager_type, aspect, mode)
    for manager_type, aspect in CASES
    for mode in MODES
    if not (mode == "chunked" and manager_type == "adaptive_last")
]


@pytest.mark.parametrize("manager_type, aspect, mode", EVERY_MODE)
def test_zero_initialised_manager_is_the_base_model_in_every_mode(
    tiny_model, tiny_processor, manager_type, aspect, mode
):
    inputs, query = batch(tiny_model, tiny_processor, aspect)
    base = generate(tiny_model, tiny_processor, inputs, query, **MODES[mode])
    apply_manager(tiny_model, ManagerConfig(manager_type=manager_type))
    assert_same_output(generate(tiny_model, tiny_processor, inputs, query, **MODES[mode]), base)


def test_seeded_sampling_with_a_manager_is_reproducible_and_not_greedy(tiny_model, tiny_processor):
    inputs, query = batch(tiny_model, tiny_processor, "anyres_max_9")
    apply_manager(tiny_model, ManagerConfig(manager_type="adaptive_last"))
    randomise_managers(tiny_model)
    sampled = [generate(tiny_model, tiny_processor, inputs, query, seed=seed, **MODES["sample"]) for seed in (0, 0, 1)]
    assert_same_output(sampled[1], sampled[0])
    assert not torch.equal(sampled[2].sequences, sampled[0].sequences)


# Per-token managers (no query): any chunking, here through the images.
@pytest.mark.parametrize(
    "manager_type, aspect", [("static", "anyres_max_9"), ("static", "square"), ("adaptive", "anyres_max_9")]
)
def test_chunked_prefill_gives_the_tokens_and_logits_of_one_prefill(tiny_model, tiny_processor, manager_type, aspect):
    inputs, _ = batch(tiny_model, tiny_processor, aspect)
    apply_manager(tiny_model, ManagerConfig(manager_type=manager_type))
    randomise_managers(tiny_model)
    whole = generate(tiny_model, tiny_processor, inputs, None, do_sample=False)
    size = MODES["chunked"]["prefill_chunk_size"]
    assert inputs["input_ids"].shape[1] > size
    chunked = generate(tiny_model, tiny_processor, inputs, None, do_sample=False, prefill_chunk_size=size)
    assert_same_output(chunked, whole, exact=False)


@pytest.mark.parametrize("manager_type, aspect", CASES)
def test_beam_scores_are_the_log_probabilities_of_full_forward_passes(tiny_model, tiny_processor, manager_type, aspect):
    inputs, query = batch(tiny_model, tiny_processor, aspect)
    apply_manager(tiny_model, ManagerConfig(manager_type=manager_type))
    randomise_managers(tiny_model)
    output = generate(tiny_model, tiny_processor, inputs, query, **MODES["beam"])
    sequences = output.sequences
    assert sequences.shape[0] == BEAMS * inputs["input_ids"].shape[0]

    # Each returned sequence through one full forward without a cache, its sample's images and query repeated.
    prompt_length = inputs["input_ids"].shape[1]
    mask = torch.cat(
        [inputs["attention_mask"].repeat_interleave(BEAMS, 0), torch.ones_like(sequences[:, prompt_length:])], 1
    )
    pixels = {
        key: value.repeat_interleave(BEAMS, 0)
        for key, value in inputs.items()
        if key in ("pixel_values", "image_sizes", "batch_num_images")
    }
    full_query = torch.cat([query.repeat_interleave(BEAMS, 0), torch.zeros_like(mask[:, prompt_length:]).bool()], 1)
    with torch.no_grad():
        logits = tiny_model(
            input_ids=sequences,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=False,
            **pixels,
            **{QUERY_MASK_KWARG: full_query},
        ).logits
    log_probs = torch.log_softmax(logits[:, prompt_length - 1 : -1].double(), dim=-1)
    generated = log_probs.gather(-1, sequences[:, prompt_length:, None]).squeeze(-1).sum(-1)
    recomputed = generated / NEW_TOKENS ** MODES["beam"]["length_penalty"]  # HF's score: sum / length ** penalty
    torch.testing.assert_close(output.sequences_scores.double(), recomputed, rtol=1e-5, atol=1e-5)
    per_sample = output.sequences_scores.view(-1, BEAMS)
    assert bool((per_sample[:, :-1] >= per_sample[:, 1:]).all())  # best first
