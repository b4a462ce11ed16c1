"""The manager inside HF LLaVA-OneVision (tiny model, fp32, CPU): exactness, the formula, generation, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from llava_integration import (
    QUERY_MASK_KWARG,
    apply_manager,
    load_manager,
    load_model,
    manager_of,
    prepare_inputs,
    remove_manager,
    save_manager,
    set_image_aspect_ratio,
)
from manager_plugin import ManagerConfig

QUESTION = "What colour is the shape?"

# Each case: (image aspect ratio, one entry per sample: the sizes (h, w) of its images, [] for text only).
CASES = {
    "grid_anyres_max": ("anyres_max_9", [[(190, 190)]]),  # a 6x6 grid, bilinearly downsampled (anyres_max_9)
    "grid_padded_batch": ("anyres_max_9", [[(150, 70)], [(40, 100)]]),
    "grid_multi_image": ("anyres_max_9", [[(40, 70), (64, 64)]]),
    "text_only": ("anyres_max_9", [[], []]),
    "grid_mixed": ("anyres_max_9", [[(100, 150)], [], [(30, 90), (90, 30)]]),
    "square_mixed": ("square", [[(100, 150)], [], [(30, 90), (90, 30)]]),
}


def make_inputs(processor, aspect, samples, seed=0):
    texts, images = [], []
    for index, sizes in enumerate(samples):
        content = [{"type": "image"}] * len(sizes) + [{"type": "text", "text": QUESTION if sizes else "Say yes."}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images.append([random_image(h, w, seed=seed + 10 * index + k) for k, (h, w) in enumerate(sizes)])
    return prepare_inputs(processor, texts, images, aspect)


def randomise_managers(model, scale=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in manager_of(model).parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def streams_entering(model, inputs, layers, before_manager):
    """The hidden states entering `layers`, seen before (or after) the manager's pre-hook adds to them."""
    seen = {}
    decoder = model.model.language_model.layers
    handles = [
        decoder[index].register_forward_pre_hook(
            lambda module, args, kwargs, index=index: seen.__setitem__(index, args[0].detach().clone()),
            with_kwargs=True,
            prepend=before_manager,
        )
        for index in layers
    ]
    try:
        logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def assert_untouched(model):
    inner = model.model
    assert not hasattr(inner, "manager") and not hasattr(inner, "_manager_runtime")
    assert "get_image_features" not in vars(inner) and "get_placeholder_mask" not in vars(inner)
    assert not inner._forward_pre_hooks and not inner._forward_hooks
    assert all(not layer._forward_pre_hooks for layer in inner.language_model.layers)
    assert not hasattr(model.config, "manager_config")


def set_aspect(model, aspect):
    if aspect == "square":
        set_image_aspect_ratio(model, "square")


@pytest.mark.parametrize("case", list(CASES))
def test_zero_initialised_patch_is_exactly_the_base_model(tiny_model, tiny_processor, case):
    aspect, samples = CASES[case]
    set_aspect(tiny_model, aspect)
    inputs = make_inputs(tiny_processor, aspect, samples)
    base = logits(tiny_model, inputs)
    apply_manager(tiny_model)
    assert torch.equal(logits(tiny_model, inputs), base)


@pytest.mark.parametrize("case", ["grid_mixed", "square_mixed", "grid_padded_batch"])
def test_nonzero_managers_change_only_tokens_from_the_first_image_on(tiny_model, tiny_processor, case):
    aspect, samples = CASES[case]
    set_aspect(tiny_model, aspect)
    inputs = make_inputs(tiny_processor, aspect, samples)
    base = logits(tiny_model, inputs)
    apply_manager(tiny_model)
    randomise_managers(tiny_model)
    patched = logits(tiny_model, inputs)
    image = inputs["input_ids"] == tiny_model.config.image_token_id
    attended = inputs["attention_mask"].bool()
    before_first_image = (torch.cumsum(image.long(), dim=1) == 0) & attended
    assert torch.equal(patched[before_first_image], base[before_first_image])
    for sample in range(len(samples)):
        changed = (patched[sample] - base[sample]).abs().amax(-1)
        if samples[sample]:
            assert changed[~before_first_image[sample] & attended[sample]].min() > 0
        else:  # text-only samples of a mixed batch are untouched
            assert changed.max() == 0


def reference_visual_features(model, inputs, vision_layers, aspect):
    """Per vision layer n: projector(hidden_state_n) + e_n, packed as HF packs the main feature, layer by layer."""
    inner = model.model
    pixel_values, image_sizes = inputs["pixel_values"], inputs["image_sizes"]
    if aspect == "square":
        crops, pixels = [1] * len(image_sizes), pixel_values[:, 0]
    else:
        per_sample = inputs["batch_num_images"].tolist()
        grid = [n == 1 for n in per_sample for _ in range(n)]
        crops = [
            image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
            if use_grid
            else 1
            for size, use_grid in zip(image_sizes, grid)
        ]
        pixels = torch.cat([values[:count] for values, count in zip(pixel_values, crops)])
    with torch.no_grad():
        hidden_states = inner.vision_tower(pixels, output_hidden_states=True).hidden_states
        embedding = inner.manager.layer_embedding.weight
        features = []
        for n, layer in enumerate(vision_layers):
            projected = inner.multi_modal_projector(hidden_states[layer]) + embedding[n]
            if aspect == "square":
                features.append(projected.reshape(-1, projected.shape[-1]))
            else:
                packed, _ = inner.pack_image_features(
                    list(torch.split(projected, crops)),
                    image_sizes,
                    image_newline=inner.image_newline,
                    vision_aspect_ratio=model.config.vision_aspect_ratio,
                )
                features.append(torch.cat(packed))
    return torch.stack(features, dim=1)  # (visual tokens, N, D)


@pytest.mark.parametrize("case", ["grid_mixed", "square_mixed", "grid_anyres_max"])
def test_injection_matches_an_independent_reference_of_the_formula(tiny_model, tiny_processor, case):
    aspect, samples = CASES[case]
    set_aspect(tiny_model, aspect)
    inputs = make_inputs(tiny_processor, aspect, samples)
    config = ManagerConfig(vision_layers=[1, 3, 5, 6], injection_layers=[0, 2, 5])
    apply_manager(tiny_model, config)
    randomise_managers(tiny_model)
    layers = config.injection_layers
    before = streams_entering(tiny_model, inputs, layers, before_manager=True)
    after = streams_entering(tiny_model, inputs, layers, before_manager=False)
    features = reference_visual_features(tiny_model, inputs, config.vision_layers, aspect)
    image = inputs["input_ids"] == tiny_model.config.image_token_id

    for slot, layer in enumerate(layers):
        weights = tiny_model.model.manager.managers[slot].layer_weights.detach()
        used = features[:, : weights.shape[0]]  # decoder layer 0: every selected layer but the last
        expected = (used * weights).sum(dim=1)
        delta = after[layer] - before[layer]
        torch.testing.assert_close(delta[image], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(delta[~image], torch.zeros_like(delta[~image]))


@pytest.mark.parametrize("grid_type", ["main", "grid"])
def test_grid_type_limits_the_manager_to_base_or_grid_tokens(tiny_model, tiny_processor, grid_type):
    inputs = make_inputs(tiny_processor, "anyres_max_9", [[(100, 150)]])
    apply_manager(tiny_model, ManagerConfig(grid_type=grid_type))
    randomise_managers(tiny_model)
    delta = (streams_entering(tiny_model, inputs, [0], False)[0] - streams_entering(tiny_model, inputs, [0], True)[0])[
        0
    ]
    visual = (inputs["input_ids"][0] == tiny_model.config.image_token_id).nonzero().squeeze(1)
    base_tokens = (tiny_model.config.vision_config.image_size // tiny_model.config.vision_config.patch_size) ** 2
    touched = delta.abs().amax(-1) > 0
    is_base = torch.zeros_like(touched)
    is_base[visual[:base_tokens]] = True
    is_grid = torch.zeros_like(touched)
    is_grid[visual[base_tokens:]] = True
    assert torch.equal(touched, is_base if grid_type == "main" else is_grid)


def test_batch_results_match_each_sample_alone(tiny_model, tiny_processor):
    samples = [[(100, 150)], [], [(30, 90), (90, 30)]]
    apply_manager(tiny_model)
    randomise_managers(tiny_model)
    batch = make_inputs(tiny_processor, "anyres_max_9", samples)
    batched = logits(tiny_model, batch)
    for index, sample in enumerate(samples):
        alone = logits(tiny_model, make_inputs(tiny_processor, "anyres_max_9", [sample], seed=10 * index))
        length = alone.shape[1]  # left padding: the sample's tokens are the batch row's last `length`
        torch.testing.assert_close(batched[index, -length:], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "aspect, samples", [("anyres_max_9", [[(100, 150)], [(40, 70), (64, 64)]]), ("square", [[(100, 150)], []])]
)
def test_greedy_generate_equals_full_forward_decoding_without_cache(tiny_model, tiny_processor, aspect, samples):
    set_aspect(tiny_model, aspect)
    apply_manager(tiny_model)
    randomise_managers(tiny_model)
    inputs = make_inputs(tiny_processor, aspect, samples)
    new_tokens = 6
    with torch.no_grad():
        generated = tiny_model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for _ in range(new_tokens):
        # Left padding: positions must skip the pads, as generate() derives them from the attention mask.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            step = tiny_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **pixels)
        next_token = step.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
    assert torch.equal(generated, ids)


def test_gradients_reach_every_manager_parameter_and_the_projector_through_the_manager(tiny_model, tiny_processor):
    inputs = make_inputs(tiny_processor, "anyres_max_9", [[(100, 150)], [(40, 70), (64, 64)]])
    apply_manager(tiny_model, ManagerConfig(manager_type="adaptive_cross"))
    tiny_model.train()

    def projector_grad():
        tiny_model.zero_grad()
        tiny_model(**inputs).logits.square().mean().backward()
        return tiny_model.model.multi_modal_projector.linear_1.weight.grad.clone()

    torch.manual_seed(0)
    zero_weights_grad = projector_grad()  # managers at zero: their path passes no gradient to the projector
    randomise_managers(tiny_model, scale=0.3)
    torch.manual_seed(0)
    with_manager_grad = projector_grad()
    for name, parameter in manager_of(tiny_model).named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert not torch.allclose(with_manager_grad, zero_weights_grad)


def test_jitter_only_in_training_mode(tiny_model, tiny_processor):
    inputs = make_inputs(tiny_processor, "anyres_max_9", [[(100, 150)]])
    apply_manager(tiny_model)
    randomise_managers(tiny_model)
    assert torch.equal(logits(tiny_model, inputs), logits(tiny_model, inputs))
    tiny_model.train()
    assert not torch.equal(logits(tiny_model, inputs), logits(tiny_model, inputs))


@pytest.mark.parametrize("manager_type", ["adaptive", "adaptive_last", "adaptive_average", "adaptive_cross"])
def test_adaptive_managers_start_as_the_base_model_and_read_the_query(tiny_model, tiny_processor, manager_type):
    inputs = make_inputs(tiny_processor, "anyres_max_9", [[(100, 150)], [], [(30, 90), (90, 30)]])
    base = logits(tiny_model, inputs)
    apply_manager(tiny_model, ManagerConfig(manager_type=manager_type))
    assert torch.equal(logits(tiny_model, inputs), base)
    randomise_managers(tiny_model)
    own_query = logits(tiny_model, inputs)
    assert not torch.equal(own_query, base)
    text = (inputs["input_ids"] != tiny_model.config.image_token_id) & inputs["attention_mask"].bool()
    with_query = logits(tiny_model, inputs, **{QUERY_MASK_KWARG: text})
    assert torch.equal(with_query, own_query) == (manager_type == "adaptive")


def test_remove_manager_restores_the_exact_original(tiny_model, tiny_processor):
    inputs = make_inputs(tiny_processor, "anyres_max_9", [[(100, 150)], []])
    base = logits(tiny_model, inputs)
    apply_manager(tiny_model)
    randomise_managers(tiny_model)
    assert not torch.equal(logits(tiny_model, inputs), base)
    remove_manager(tiny_model)
    assert_untouched(tiny_model)
    assert torch.equal(logits(tiny_model, inputs), base)
    with pytest.raises(ValueError, match="has no manager"):
        remove_manager(tiny_model)


def test_applying_twice_is_an_error(tiny_model):
    apply_manager(tiny_model)
    with pytest.raises(ValueError, match="already has a manager"):
        apply_manager(tiny_model)


def test_manager_parameters_are_named_and_placed_like_the_model(tiny_dir, tiny_model):
    apply_manager(tiny_model)
    names = [name for name, _ in tiny_model.named_parameters() if name.startswith("model.manager.")]
    assert names and all("manager" in name for name in names)
    assert len(names) == len(list(manager_of(tiny_model).parameters()))

    half = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    apply_manager(half)
    assert {p.dtype for p in manager_of(half).parameters()} == {torch.bfloat16}

    with torch.device("meta"):
        meta = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig.from_pretrained(tiny_dir))
    apply_manager(meta)
    assert all(p.is_meta for p in manager_of(meta).parameters())


def test_adapter_round_trip_gives_identical_logits(tiny_dir, tiny_model, tiny_processor, tmp_path):
    inputs = make_inputs(tiny_processor, "anyres_max_9", [[(100, 150)], [(40, 70), (64, 64)]])
    apply_manager(tiny_model, ManagerConfig(manager_type="adaptive_last", grid_type="main"))
    randomise_managers(tiny_model)
    expected = logits(tiny_model, inputs)
    save_manager(tiny_model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["manager.safetensors", "manager_config.json"]

    fresh = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    load_manager(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh, inputs), expected)
    assert torch.equal(logits(load_model(tiny_dir, manager=tmp_path / "adapter").eval(), inputs), expected)


@pytest.mark.parametrize("aspect", ["anyres_max_9", "square"])
def test_merged_checkpoint_round_trip_gives_identical_logits(tiny_dir, tiny_model, tiny_processor, tmp_path, aspect):
    set_aspect(tiny_model, aspect)
    inputs = make_inputs(tiny_processor, aspect, [[(100, 150)], []])
    base = logits(tiny_model, inputs)
    apply_manager(tiny_model)
    randomise_managers(tiny_model)
    expected = logits(tiny_model, inputs)
    tiny_model.save_pretrained(tmp_path / "merged")

    restored = load_model(tmp_path / "merged").eval()
    assert manager_of(restored).config == manager_of(tiny_model).config
    assert torch.equal(logits(restored, inputs), expected)
    if aspect != "square":  # the plain HF class reads the same directory as the base model
        plain = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
        assert torch.equal(logits(plain, inputs), base)


def test_merged_checkpoint_without_the_manager_tensors_is_refused(tiny_model, tmp_path):
    """HF would leave the missing manager parameters as uninitialised memory (values up to 1e38 seen)."""
    from safetensors.torch import load_file, save_file

    apply_manager(tiny_model)
    tiny_model.save_pretrained(tmp_path / "merged")
    weights_file = tmp_path / "merged" / "model.safetensors"
    weights = load_file(weights_file)
    dropped = sorted(key for key in weights if key.startswith("model.manager."))
    assert dropped  # the precondition: the merged file held them
    save_file({k: v for k, v in weights.items() if k not in dropped}, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"merged: config.json records a manager but the weights lack {len(dropped)}"):
        load_model(tmp_path / "merged")
    save_file({k: v for k, v in weights.items() if k != dropped[0]}, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"lack 1 of its tensors \({dropped[0]}\)"):
        load_model(tmp_path / "merged")


@pytest.mark.parametrize(
    "config, message",
    [
        (ManagerConfig(vision_layers=[3, 9]), r"vision layer 9 out of range: the tower has 7 hidden states \(0..6\)"),
        (ManagerConfig(injection_layers=[0, 6]), r"injection layer 6 out of range: .* 6 decoder layers \(0..5\)"),
        (ManagerConfig(hidden_size=32), r"manager hidden_size 32 does not match the model: .* hidden size 64"),
    ],
)
def test_bad_configs_leave_the_model_untouched(tiny_model, config, message):
    with pytest.raises(ValueError, match=message):
        apply_manager(tiny_model, config)
    assert_untouched(tiny_model)


def test_bad_adapters_leave_the_model_untouched(tiny_dir, tiny_model, tmp_path):
    donor = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir)
    apply_manager(donor)
    save_manager(donor, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "manager_config.json"
    original = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**original, "hidden_size": 128}))  # saved for a wider model
    with pytest.raises(ValueError, match="manager hidden_size 128 does not match the model: .* hidden size 64"):
        load_manager(tiny_model, tmp_path / "adapter")
    assert_untouched(tiny_model)

    config_path.write_text(json.dumps({**original, "manager_type": "dynamic"}))
    with pytest.raises(ValueError, match="unknown manager_type 'dynamic'"):
        load_manager(tiny_model, tmp_path / "adapter")
    assert_untouched(tiny_model)

    config_path.write_text(json.dumps({**original, "vision_layers": [1, 2, 3, 4]}))  # tensors saved for 3 layers
    with pytest.raises(
        ValueError, match=r"manager weight layer_embedding.weight in .* has shape \(3, 64\), expected \(4, 64\)"
    ):
        load_manager(tiny_model, tmp_path / "adapter")
    assert_untouched(tiny_model)


def test_models_outside_the_llava_family_are_refused():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    supported = (
        "LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaNextVideoForConditionalGeneration, "
        "LlavaOnevisionForConditionalGeneration"
    )
    with pytest.raises(TypeError, match=f"expected one of {supported} .* got Qwen2ForCausalLM"):
        apply_manager(model)
    assert not any("manager" in name for name, _ in model.named_parameters())


def test_unknown_image_aspect_ratio_is_refused(tiny_model):
    with pytest.raises(ValueError, match="unknown image aspect ratio 'pad'"):
        set_image_aspect_ratio(tiny_model, "pad")
    apply_manager(tiny_model, ManagerConfig(grid_type="grid"))
    with pytest.raises(ValueError, match="square images .* have none"):
        set_image_aspect_ratio(tiny_model, "square")


def test_instruction_query_mask_marks_the_text_of_the_user_turn_holding_the_images(tiny_processor):
    from llava_integration import instruction_query_mask

    tokenizer = tiny_processor.tokenizer
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]},
    ]
    chat = tokenizer(tiny_processor.apply_chat_template(conversation), return_tensors="pt")
    text_only = tokenizer(
        tiny_processor.apply_chat_template([{"role": "user", "content": "Say yes."}]), return_tensors="pt"
    )
    plain = tokenizer("<image>a red circle\n", return_tensors="pt")  # stage 1: the only text is the caption
    for encoded, expected in ((chat, QUESTION), (text_only, ""), (plain, "")):
        mask = instruction_query_mask(encoded.input_ids[0], tokenizer)
        assert tokenizer.decode(encoded.input_ids[0][mask]) == expected
    batch = tokenizer(
        [tiny_processor.apply_chat_template(conversation), "<image>a red circle\n"], padding=True, return_tensors="pt"
    )
    masks = instruction_query_mask(batch.input_ids, tokenizer, batch.attention_mask)
    assert [tokenizer.decode(ids[mask]) for ids, mask in zip(batch.input_ids, masks)] == [QUESTION, ""]


@pytest.mark.parametrize("sizes, gathered", [([(64, 64)], True), ([(33, 200), (64, 64)], True), ([(190, 190)], False)])
def test_manager_features_are_packed_exactly_as_hf_packs_each_layer(tiny_model, tiny_processor, sizes, gathered):
    """Packing by row gather (no downsampling) or by HF's packing (downsampled) equals HF packing each layer alone."""
    from functools import partial

    from llava_integration.families import onevision_pack
    from llava_integration.features import pack_like_main_feature, packed_rows, patches_per_image

    inner = tiny_model.model
    inputs = make_inputs(tiny_processor, "anyres_max_9", [[size] for size in sizes])
    crops = patches_per_image(inner.config, inputs["image_sizes"], inputs["batch_num_images"], "anyres_max_9")
    pack = partial(onevision_pack, inner, strategy="full", image_mode="anyres_max_9")
    assert (packed_rows(inputs["image_sizes"], crops, 16, pack)[0] is not None) == gathered
    experts = torch.randn(sum(crops), 16, 3, 64)
    packed, _ = pack_like_main_feature(inner, experts, inputs["image_sizes"], crops, pack)
    with torch.no_grad():
        reference = [
            torch.cat(
                inner.pack_image_features(
                    list(torch.split(experts[:, :, n], crops)),
                    inputs["image_sizes"],
                    image_newline=inner.image_newline,
                    vision_aspect_ratio="anyres_max_9",
                )[0]
            )
            for n in range(3)
        ]
    assert torch.equal(packed, torch.stack(reference, dim=1))


def test_square_images_and_videos_share_a_batch(tiny_model, tiny_processor):
    """Square mode: the images' tokens are expanded by `prepare_inputs`, the videos' as the processor counts them."""
    import numpy as np

    set_image_aspect_ratio(tiny_model, "square")
    content = [{"type": "video"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    texts = [
        tiny_processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True),
        tiny_processor.apply_chat_template([{"role": "user", "content": "Say yes."}], add_generation_prompt=True),
    ]
    frames = (np.random.default_rng(0).random((4, 48, 48, 3)) * 255).astype("uint8")
    inputs = prepare_inputs(tiny_processor, texts, [[random_image(30, 50)], []], "square", videos=[[frames], []])
    ids = inputs["input_ids"]
    assert int((ids == tiny_model.config.image_token_id).sum()) == 16  # one 32 px crop, no newline
    assert int((ids == tiny_model.config.video_token_id).sum()) == 4 * 2 * 2 + 1  # 4 pooled frames, a newline
    base = logits(tiny_model, inputs)
    apply_manager(tiny_model)
    assert torch.equal(logits(tiny_model, inputs), base)
    randomise_managers(tiny_model)
    delta = streams_entering(tiny_model, inputs, [0], False)[0] - streams_entering(tiny_model, inputs, [0], True)[0]
    visual = (ids == tiny_model.config.image_token_id) | (ids == tiny_model.config.video_token_id)
    assert torch.equal(delta.abs().amax(-1) > 0, visual)


# A grid image kept whole (unpadded, not downsampled) with a text-only sample and a multi-image sample (base views
# only), and a grid bilinearly downsampled by anyres_max_9.
GRID_TYPE_SAMPLES = {"kept": [[(33, 200)], [], [(40, 70), (64, 64)]], "downsampled": [[(190, 190)]]}


@pytest.mark.parametrize("samples", list(GRID_TYPE_SAMPLES))
@pytest.mark.parametrize("grid_type", ["main", "grid"])
def test_grid_type_main_and_grid_project_only_the_tokens_they_serve(tiny_model, tiny_processor, grid_type, samples):
    """The served tokens get the formula's delta, the others exactly nothing, and only served crop tokens reach the
    projector for the manager (all crop tokens where a grid was downsampled: packing mixes them)."""
    aspect = "anyres_max_9"
    inputs = make_inputs(tiny_processor, aspect, GRID_TYPE_SAMPLES[samples])
    inner, vision = tiny_model.model, tiny_model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    with torch.no_grad():  # HF's own packed main feature: its newline tokens are `image_newline` exactly
        packed = inner.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
        ).pooler_output
    served, newline, all_crop_tokens = [], [], 0
    for image, (size, count) in enumerate(
        zip(inputs["image_sizes"], inputs["batch_num_images"].repeat_interleave(inputs["batch_num_images"]))
    ):
        offset = torch.arange(packed[image].shape[0])
        served.append(offset < tokens if grid_type == "main" else offset >= tokens)
        newline.append((packed[image] == inner.image_newline).all(-1))
        crops = (
            1
            if count > 1
            else image_size_to_num_patches(size, tiny_model.config.image_grid_pinpoints, vision.image_size)
        )
        all_crop_tokens += crops * tokens
    served, newline = torch.cat(served), torch.cat(newline)

    config = ManagerConfig(vision_layers=[1, 3, 5, 6], injection_layers=[0, 2, 5], grid_type=grid_type)
    apply_manager(tiny_model, config)
    randomise_managers(tiny_model)
    rows = []
    hook = inner.multi_modal_projector.register_forward_hook(
        lambda module, args, output: rows.append(args[0].shape[:-1].numel())
    )
    try:
        before = streams_entering(tiny_model, inputs, config.injection_layers, before_manager=True)
    finally:
        hook.remove()
    after = streams_entering(tiny_model, inputs, config.injection_layers, before_manager=False)
    manager_rows = sum(rows) - all_crop_tokens  # the main feature projects every crop token once
    downsampled = samples == "downsampled"
    expected_rows = all_crop_tokens if downsampled and grid_type == "grid" else int((served & ~newline).sum())
    assert manager_rows == len(config.vision_layers) * expected_rows

    features = reference_visual_features(tiny_model, inputs, config.vision_layers, aspect)
    image = inputs["input_ids"] == tiny_model.config.image_token_id
    for slot, layer in enumerate(config.injection_layers):
        weights = inner.manager.managers[slot].layer_weights.detach()
        expected = (features[:, : weights.shape[0]] * weights).sum(dim=1) * served[:, None]
        delta = after[layer] - before[layer]
        torch.testing.assert_close(delta[image], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(delta[image][~served], torch.zeros_like(delta[image][~served]))
        assert torch.equal(delta[~image], torch.zeros_like(delta[~image]))
