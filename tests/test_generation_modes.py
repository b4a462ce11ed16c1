"""Every generation mode with a manager (tiny model, fp32, CPU): greedy, seeded sampling, beam search and chunked
prefill, for static and adaptive (instruction-query) managers on padded batches of grid and square images."""

from __future__ import annotations

import weakref

import pytest
import torch
from test_llava_integration import make_inputs, randomise_managers, set_aspect

from llava_integration import QUERY_MASK_KWARG, apply_manager, instruction_query_mask, prompt_query
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
    torch.manual_seed(seed)
    with torch.no_grad(), prompt_query(model, query):
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
# Managers of the base views' or the grids' tokens only: the others carry no features through generate.
GRID_TYPE_CASES = [("static", "anyres_max_9", "grid"), ("adaptive_last", "anyres_max_9", "main")]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("manager_type, aspect", CASES)
def test_zero_initialised_manager_is_the_base_model_in_every_mode(
    tiny_model, tiny_processor, manager_type, aspect, mode
):
    inputs, query = batch(tiny_model, tiny_processor, aspect)
    settings = dict(MODES[mode])
    if mode == "chunked" and manager_type == "adaptive_last":
        settings["prefill_chunk_size"] = chunk_size(manager_type, inputs, query, tiny_model.config.image_token_id)
    base = generate(tiny_model, tiny_processor, inputs, query, **settings)
    apply_manager(tiny_model, ManagerConfig(manager_type=manager_type))
    assert_same_output(generate(tiny_model, tiny_processor, inputs, query, **settings), base)


def test_seeded_sampling_with_a_manager_is_reproducible_and_not_greedy(tiny_model, tiny_processor):
    inputs, query = batch(tiny_model, tiny_processor, "anyres_max_9")
    apply_manager(tiny_model, ManagerConfig(manager_type="adaptive_last"))
    randomise_managers(tiny_model)
    sampled = [generate(tiny_model, tiny_processor, inputs, query, seed=seed, **MODES["sample"]) for seed in (0, 0, 1)]
    assert_same_output(sampled[1], sampled[0])
    assert not torch.equal(sampled[2].sequences, sampled[0].sequences)


def chunk_size_keeping_images_with_their_instruction(inputs, query, image_token_id):
    """The smallest prefill chunk size (several chunks) whose boundaries split no sample's images from its query."""
    length = inputs["input_ids"].shape[1]
    positions = torch.arange(length)
    image = inputs["input_ids"] == image_token_id
    first = torch.where(image, positions, length).amin(dim=1)
    last = torch.where(image | query, positions, -1).amax(dim=1)
    for size in range(2, length):
        if bool((first // size == last // size).all()):
            return size
    raise AssertionError("no chunk size keeps every sample's images and instruction together")


def chunk_size(manager_type, inputs, query, image_token_id):
    if manager_type == "adaptive_last":  # reads the instruction with the visual tokens: both in one chunk
        return chunk_size_keeping_images_with_their_instruction(inputs, query, image_token_id)
    return MODES["chunked"]["prefill_chunk_size"]  # per-token managers: any chunking, here through the images


@pytest.mark.parametrize(
    "manager_type, aspect, grid_type",
    [*((*case, "all") for case in CASES), ("adaptive", "anyres_max_9", "all"), *GRID_TYPE_CASES],
)
def test_chunked_prefill_gives_the_tokens_and_logits_of_one_prefill(
    tiny_model, tiny_processor, manager_type, aspect, grid_type
):
    inputs, query = batch(tiny_model, tiny_processor, aspect)
    apply_manager(tiny_model, ManagerConfig(manager_type=manager_type, grid_type=grid_type))
    randomise_managers(tiny_model)
    whole = generate(tiny_model, tiny_processor, inputs, query, do_sample=False)
    size = chunk_size(manager_type, inputs, query, tiny_model.config.image_token_id)
    assert inputs["input_ids"].shape[1] > size
    chunked = generate(tiny_model, tiny_processor, inputs, query, do_sample=False, prefill_chunk_size=size)
    assert_same_output(chunked, whole, exact=False)


def test_chunked_prefill_that_splits_a_query_from_its_images_is_refused(tiny_model, tiny_processor):
    inputs, query = batch(tiny_model, tiny_processor, "anyres_max_9")
    apply_manager(tiny_model, ManagerConfig(manager_type="adaptive_last"))
    with pytest.raises(ValueError, match="query tokens in another"):
        generate(tiny_model, tiny_processor, inputs, query, do_sample=False, prefill_chunk_size=9)
    with pytest.raises(ValueError, match="split the visual tokens"):  # no instruction: the images are the query
        generate(tiny_model, tiny_processor, inputs, None, do_sample=False, prefill_chunk_size=9)


@pytest.mark.parametrize("manager_type, aspect, grid_type", [*((*case, "all") for case in CASES), *GRID_TYPE_CASES])
def test_beam_scores_are_the_log_probabilities_of_full_forward_passes(
    tiny_model, tiny_processor, manager_type, aspect, grid_type
):
    inputs, query = batch(tiny_model, tiny_processor, aspect)
    apply_manager(tiny_model, ManagerConfig(manager_type=manager_type, grid_type=grid_type))
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


@pytest.mark.parametrize("manager_type", ["static", "adaptive_last"])
def test_manager_features_are_freed_after_the_prefill(tiny_model, tiny_processor, manager_type):
    """The features generate's encoding made are gone by the first decode step, whatever generate still holds."""
    inputs, query = batch(tiny_model, tiny_processor, "anyres_max_9")
    apply_manager(tiny_model, ManagerConfig(manager_type=manager_type))
    randomise_managers(tiny_model)
    runtime = tiny_model.model._manager_runtime
    issued, alive = [], []
    issue = runtime._issue

    def watched_issue(modality, output, features, *placement):  # static: a delta per layer; adaptive: the N layers
        tensors = features.values() if isinstance(features, dict) else [features]
        issued.extend(weakref.ref(tensor) for tensor in tensors)
        return issue(modality, output, features, *placement)

    def at_decode_steps(module, args, kwargs):
        if kwargs.get("mm_encoder_outputs") is None and kwargs.get("pixel_values") is None:
            alive.append(any(ref() is not None for ref in issued) or bool(runtime._encodings))

    runtime._issue = watched_issue
    handle = tiny_model.model.register_forward_pre_hook(at_decode_steps, with_kwargs=True)
    try:
        output = generate(tiny_model, tiny_processor, inputs, query, do_sample=False)
    finally:
        handle.remove()
        del runtime._issue
    expected = 1 if manager_type != "static" else len(tiny_model.model.manager.config.injection_layers)
    assert len(issued) == expected and alive == [False] * (NEW_TOKENS - 1)
    assert output.sequences.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    image_outputs = tiny_model(**inputs).image_outputs  # what a forward returns: as HF's, one vision layer kept
    assert image_outputs.deepstack_features is None
    assert sum(hidden is not None for hidden in image_outputs.hidden_states) == 1
