"""The manager on every LLaVA family in transformers (tiny random models, fp32, CPU): LLaVA-1.5, LLaVA-NeXT,
LLaVA-NeXT-Video and LLaVA-OneVision, on images, videos and mixed batches.

Inputs are built by hand: token counts come from the base model's own `get_image_features` /
`get_video_features`, so no processor is needed and every family is exercised the same way.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from llava_integration import apply_manager, load_manager, load_model, manager_of, remove_manager, save_manager
from manager_plugin import ManagerConfig

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGE_TOKEN, VIDEO_TOKEN, PAD = 100, 101, 0
VOCAB = 128
CROP = 32  # px; patch 8 -> a 4x4 grid of 16 patch tokens per crop
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
FRAMES = 2


def clip() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=CROP, patch_size=8
    )


def llama() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )


def build(family: str, **overrides) -> torch.nn.Module:
    """A tiny random model of `family` in eval mode: CLIP + Llama (LLaVA-1.5, NeXT, NeXT-Video), SigLIP + Qwen2 (OV)."""
    ids = {"image_token_id": IMAGE_TOKEN}
    if family == "llava":
        config = LlavaConfig(vision_config=clip(), text_config=llama(), **ids)
        cls = LlavaForConditionalGeneration
    elif family == "llava_next":
        config = LlavaNextConfig(vision_config=clip(), text_config=llama(), image_grid_pinpoints=PINPOINTS, **ids)
        cls = LlavaNextForConditionalGeneration
    elif family == "llava_next_video":
        config = LlavaNextVideoConfig(
            vision_config=clip(),
            text_config=llama(),
            image_grid_pinpoints=PINPOINTS,
            video_token_id=VIDEO_TOKEN,
            spatial_pool_mode="conv",  # mixes channels: each layer must be pooled alone, as HF pools the main one
            **ids,
        )
        cls = LlavaNextVideoForConditionalGeneration
    else:
        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=CROP,
            patch_size=8, vision_use_head=False,
        )  # fmt: skip
        text = Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=PAD,
        )  # fmt: skip
        config = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=text,
            video_token_id=VIDEO_TOKEN,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=PINPOINTS,
            vision_aspect_ratio="anyres_max_9",
            **ids,
        )
        cls = LlavaOnevisionForConditionalGeneration
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return cls(config).eval()


FAMILIES = ["llava", "llava_next", "llava_next_video", "llava_onevision"]
VIDEO_FAMILIES = ["llava_next_video", "llava_onevision"]
IMAGE_SIZES = [(48, 70), (70, 40), (32, 32)]  # (h, w) of the i-th image a batch holds


def make_inputs(model, samples, padding="left", seed=0):
    """A batch of hand-built samples: each a string of "i" (an image), "v" (a video) and "t" (a few text tokens).

    Pixels are random; how many placeholder tokens each image/video takes is what the base model's own
    `get_image_features` / `get_video_features` make of them.
    """
    generator = torch.Generator().manual_seed(seed)
    inner = model.model
    num_images = sum(sample.count("i") for sample in samples)
    num_videos = sum(sample.count("v") for sample in samples)
    batch = {}
    image_lengths, video_lengths = [], []
    family = model.config.model_type
    with torch.no_grad():
        if num_images:
            sizes = torch.tensor([IMAGE_SIZES[k % len(IMAGE_SIZES)] for k in range(num_images)])
            if family == "llava":
                batch["pixel_values"] = torch.randn(num_images, 3, CROP, CROP, generator=generator)
                features = inner.get_image_features(batch["pixel_values"]).pooler_output
            else:
                batch["pixel_values"] = torch.randn(num_images, 5, 3, CROP, CROP, generator=generator)
                batch["image_sizes"] = sizes
                features = inner.get_image_features(batch["pixel_values"], sizes).pooler_output
            image_lengths = [len(feature) for feature in features]
        if num_videos:
            batch["pixel_values_videos"] = torch.randn(num_videos, FRAMES, 3, CROP, CROP, generator=generator)
            video_lengths = [inner.get_video_features(batch["pixel_values_videos"]).pooler_output.shape[1]] * num_videos
    rows, images, videos = [], iter(image_lengths), iter(video_lengths)
    for sample in samples:
        row = [1]
        for part in sample:
            if part == "i":
                row += [IMAGE_TOKEN] * next(images)
            elif part == "v":
                row += [VIDEO_TOKEN] * next(videos)
            row += torch.randint(2, 90, (3,), generator=generator).tolist()
        rows.append(row)
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), PAD)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(longest - len(row), longest) if padding == "left" else slice(0, len(row))
        ids[index, span] = torch.tensor(row)
        mask[index, span] = 1
    return {"input_ids": ids, "attention_mask": mask, **batch}


def randomise(model, scale=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in manager_of(model).parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def streams_entering(model, inputs, layer, before_manager):
    """The hidden states entering decoder `layer`, seen before (or after) the manager's pre-hook adds to them."""
    seen = {}
    handle = model.model.language_model.layers[layer].register_forward_pre_hook(
        lambda module, args, kwargs: seen.__setitem__("x", args[0].detach().clone()),
        with_kwargs=True,
        prepend=before_manager,
    )
    try:
        logits(model, inputs)
    finally:
        handle.remove()
    return seen["x"]


def assert_untouched(model):
    inner = model.model
    assert not hasattr(inner, "manager") and not hasattr(inner, "_manager_runtime")
    assert not {"get_image_features", "get_video_features", "get_placeholder_mask"} & set(vars(inner))
    assert not inner._forward_pre_hooks and not inner._forward_hooks
    assert all(not layer._forward_pre_hooks for layer in inner.language_model.layers)
    assert not hasattr(model.config, "manager_config")


def cases(family):
    """Batches to check: images (left and right padding), text only, and for video families videos and mixtures."""
    found = {
        "images_left": (["ti", "it"], "left"),
        "images_right": (["tit", "i"], "right"),
        "text": (["t", "tt"], "left"),
    }
    if family in VIDEO_FAMILIES:
        found.update(
            videos=(["tv", "vt"], "right"),
            mixed_left=(["it", "tv", "t", "ivt"], "left"),
            mixed_right=(["vti", "i", "t"], "right"),
        )
    return found


@pytest.mark.parametrize(
    "family, case", [(family, case) for family in FAMILIES for case in cases(family)], ids=lambda value: str(value)
)
def test_fresh_patch_is_bit_identical_to_the_base_model(family, case):
    model = build(family)
    samples, padding = cases(family)[case]
    inputs = make_inputs(model, samples, padding)
    base = logits(model, inputs)
    apply_manager(model)
    assert torch.equal(logits(model, inputs), base)
    randomise(model)
    if "i" in "".join(samples) or "v" in "".join(samples):
        assert not torch.equal(logits(model, inputs), base)
    else:
        assert torch.equal(logits(model, inputs), base)


@pytest.mark.parametrize(
    "family, samples", [(f, ["ti", "it"]) for f in FAMILIES] + [(f, ["ivt", "tv", "t"]) for f in VIDEO_FAMILIES]
)
def test_greedy_generate_equals_full_forward_passes_without_cache(family, samples):
    model = build(family)
    apply_manager(model)
    randomise(model)
    inputs = make_inputs(model, samples, "left")
    new_tokens = 4
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD
        )
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions skip the pads, as generate() does
        with torch.no_grad():
            step = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **pixels)
        next_token = step.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
    assert torch.equal(generated, ids)


def reference_image_features(model, inputs, layers):
    """Per vision layer n: projector(hidden_state_n) + e_n, packed layer by layer as HF packs the main feature."""
    inner, config = model.model, model.config
    family = config.model_type
    pixels, sizes = inputs["pixel_values"], inputs.get("image_sizes")
    if family == "llava":
        crops = [1] * len(pixels)
    else:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, CROP) for size in sizes]
        pixels = torch.cat([values[:count] for values, count in zip(pixels, crops)])
    hidden_states = inner.vision_tower(pixels, output_hidden_states=True).hidden_states
    embedding = inner.manager.layer_embedding.weight
    features = []
    for n, layer in enumerate(layers):
        selected = hidden_states[layer]
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        projected = inner.multi_modal_projector(selected) + embedding[n]
        if family == "llava":
            features.append(projected.reshape(-1, projected.shape[-1]))
            continue
        per_image = list(torch.split(projected, crops))
        if family == "llava_onevision":
            packed, _ = inner.pack_image_features(per_image, sizes, image_newline=inner.image_newline)
        else:
            packed, _ = inner.pack_image_features(
                per_image, sizes, config.vision_feature_select_strategy, inner.image_newline
            )
        features.append(torch.cat(packed))
    return torch.stack(features, dim=1)  # (image tokens, N, D)


def reference_video_features(model, inputs, layers):
    """Per vision layer n: HF's frame pooling of that layer alone (NeXT-Video: resampler then projector; OneVision:
    projector then bilinear pooling), + e_n, frames end to end, closed by `image_newline` on OneVision."""
    inner, config = model.model, model.config
    videos = inputs["pixel_values_videos"]
    hidden_states = inner.vision_tower(videos.flatten(0, 1), output_hidden_states=True).hidden_states
    embedding = inner.manager.layer_embedding.weight
    features = []
    for n, layer in enumerate(layers):
        selected = hidden_states[layer]
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        if config.model_type == "llava_next_video":
            frames = inner.multi_modal_projector(inner.vision_resampler(selected))
        else:
            projected = inner.multi_modal_projector(selected)
            grid = projected.view(len(projected), 4, 4, -1).permute(0, 3, 1, 2)
            pooled = torch.nn.functional.interpolate(grid, size=[2, 2], mode="bilinear")
            frames = pooled.permute(0, 2, 3, 1).reshape(len(projected), 4, -1)
        per_video = (frames + embedding[n]).reshape(len(videos), -1, frames.shape[-1])
        if config.model_type == "llava_onevision":
            newline = inner.image_newline.expand(len(videos), 1, -1)
            per_video = torch.cat((per_video, newline), dim=1)
        features.append(per_video.reshape(-1, per_video.shape[-1]))
    return torch.stack(features, dim=1)  # (video tokens, N, D)


@pytest.mark.parametrize(
    "family, samples",
    [(f, ["ti", "it"]) for f in FAMILIES] + [(f, ["tv", "ivt", "t"]) for f in VIDEO_FAMILIES],
)
def test_injection_matches_an_independent_reference_of_the_formula(family, samples):
    model = build(family)
    config = ManagerConfig(vision_layers=[1, 2, 3], injection_layers=[0, 2])
    apply_manager(model, config)
    randomise(model)
    inputs = make_inputs(model, samples, "left")
    ids = inputs["input_ids"]
    with torch.no_grad():
        expected = {}
        if "pixel_values" in inputs:
            expected[IMAGE_TOKEN] = reference_image_features(model, inputs, config.vision_layers)
        if "pixel_values_videos" in inputs:
            expected[VIDEO_TOKEN] = reference_video_features(model, inputs, config.vision_layers)
    for slot, layer in enumerate(config.injection_layers):
        delta = streams_entering(model, inputs, layer, False) - streams_entering(model, inputs, layer, True)
        weights = model.model.manager.managers[slot].layer_weights.detach()
        visual = torch.zeros_like(ids, dtype=torch.bool)
        for token, features in expected.items():
            at = ids == token
            # decoder layer 0: every selected layer but the last one
            torch.testing.assert_close(delta[at], (features[:, : len(weights)] * weights).sum(1), rtol=1e-5, atol=1e-5)
            visual |= at
        assert torch.equal(delta[~visual], torch.zeros_like(delta[~visual]))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("modalities", ["images", "videos"])
def test_modalities_limit_the_manager_to_image_or_video_tokens(family, modalities):
    model = build(family)
    apply_manager(model, ManagerConfig(modalities=modalities, injection_layers=[1]))
    randomise(model)
    inputs = make_inputs(model, ["ivt", "tv"], "right")
    delta = streams_entering(model, inputs, 1, False) - streams_entering(model, inputs, 1, True)
    touched = delta.abs().amax(-1) > 0
    assert torch.equal(touched, inputs["input_ids"] == (IMAGE_TOKEN if modalities == "images" else VIDEO_TOKEN))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_round_trip_and_merged_checkpoint_per_family(family, tmp_path):
    model = build(family)
    inputs = make_inputs(model, ["ivt", "t"] if family in VIDEO_FAMILIES else ["it", "t"], "left")
    apply_manager(model, ManagerConfig(manager_type="adaptive_last"))
    randomise(model, scale=0.3)
    expected = logits(model, inputs)
    save_manager(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "manager_config.json").read_text())["model_family"] == family

    fresh = build(family)
    load_manager(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh, inputs), expected)

    model.save_pretrained(tmp_path / "merged")
    restored = load_model(tmp_path / "merged").eval()
    assert type(restored).__mro__[1] is type(model)
    assert manager_of(restored).config == manager_of(model).config
    assert torch.equal(logits(restored, inputs), expected)


def test_an_adapter_refuses_a_model_of_another_family(tmp_path):
    donor = build("llava_next")
    apply_manager(donor)
    save_manager(donor, tmp_path / "adapter")
    for other in ("llava", "llava_next_video", "llava_onevision"):
        model = build(other)
        with pytest.raises(ValueError, match=f"made for llava_next models, but the model is a {other} model"):
            load_manager(model, tmp_path / "adapter")
        assert_untouched(model)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_a_video_only_manager_is_refused_by_an_image_only_model(family):
    model = build(family)
    with pytest.raises(ValueError, match=f"modalities 'videos' .* but {model.__class__.__name__} takes no videos"):
        apply_manager(model, ManagerConfig(modalities="videos"))
    assert_untouched(model)


def test_grid_type_grid_is_refused_by_llava_1_5_whose_images_have_no_grid():
    model = build("llava")
    with pytest.raises(ValueError, match="grid_type 'grid' manages the grid tokens, but the images of Llava"):
        apply_manager(model, ManagerConfig(grid_type="grid"))
    assert_untouched(model)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_one_training_step_with_the_manager(family):
    """A zero-initialised manager learns: its layer weights get gradients, a step moves them and lowers the loss on
    the batch, after which the gradient reaches every manager parameter (the layer embedding too)."""
    model = build(family)
    apply_manager(model)
    model.train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("manager" in name)
    inputs = make_inputs(model, ["tit", "ti"], "right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    managers = manager_of(model)
    optimizer = torch.optim.SGD(managers.parameters(), lr=0.5)

    def step():
        optimizer.zero_grad()
        torch.manual_seed(0)  # the same jitter each time
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        return loss.detach()

    first = step()
    for manager in managers.managers:
        assert manager.layer_weights.grad.abs().sum() > 0
    optimizer.step()
    assert all(manager.layer_weights.abs().sum() > 0 for manager in managers.managers)
    assert step() < first
    for name, parameter in managers.named_parameters():
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_manager_restores_the_exact_original(family):
    model = build(family)
    inputs = make_inputs(model, ["ivt", "t"] if family in VIDEO_FAMILIES else ["it", "t"], "left")
    base = logits(model, inputs)
    apply_manager(model)
    randomise(model)
    remove_manager(model)
    assert_untouched(model)
    assert torch.equal(logits(model, inputs), base)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_next_video"])
def test_only_onevision_switches_image_modes(family):
    from llava_integration import set_image_aspect_ratio

    model = build(family)
    with pytest.raises(ValueError, match="image aspect ratio 'square': .* has one image mode"):
        set_image_aspect_ratio(model, "square")
    assert_untouched(model)


@pytest.mark.parametrize("family", ["llava", "llava_next_video"])
def test_managers_take_the_models_dtype_and_device(family):
    half = build(family).to(torch.bfloat16)
    apply_manager(half)
    assert {parameter.dtype for parameter in manager_of(half).parameters()} == {torch.bfloat16}
    with torch.device("meta"):
        meta = type(half)(half.config)
    apply_manager(meta)
    assert all(parameter.is_meta for parameter in manager_of(meta).parameters())


def test_defaults_resolve_per_model_as_for_onevision():
    """LLaVA-1.5-7B's shape (HF's default LlavaConfig): CLIP-L/336, main feature -2 = hidden state 23 of 25, Llama with
    32 layers: vision layers 11..22, injection every 4th decoder layer."""
    from llava_integration.patch import resolve_manager_config

    resolved = resolve_manager_config(LlavaConfig(), ManagerConfig())
    assert resolved.vision_layers == list(range(11, 23))
    assert resolved.injection_layers == list(range(0, 32, 4))
    assert (resolved.hidden_size, resolved.model_family, resolved.modalities) == (4096, "llava", "both")
