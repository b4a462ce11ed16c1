"""ManagerTowerModel: bridge mode equals HF BridgeTower, manager behaviour, config checks, parameter count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import (
    BridgeTowerConfig,
    BridgeTowerModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    RobertaConfig,
    RobertaModel,
)

from manager_plugin.managertower import (
    AdaptiveAggregation,
    ManagerTowerConfig,
    ManagerTowerModel,
    StaticAggregation,
)
from manager_plugin.managertower.tiny import tiny_config
from manager_plugin.managertower.unimodal import set_image_size

pytestmark = pytest.mark.usefixtures("single_thread")  # the tiny model is fastest on one thread

VOCAB = 100


def _bridgetower(seed: int, text_layers, cross_layers, hidden, heads, vision_hidden, image_size, patch, **extra):
    torch.manual_seed(seed)
    config = BridgeTowerConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=cross_layers,
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": heads,
            "intermediate_size": 2 * hidden,
            "max_position_embeddings": 40,
        },
        vision_config={
            "hidden_size": vision_hidden,
            "num_hidden_layers": text_layers,
            "patch_size": patch,
            "image_size": image_size,
        },
        **extra,
    )
    return BridgeTowerModel(config).eval()


def _text_batch(batch: int, length: int, lengths: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for row, used in enumerate(lengths):
        attention_mask[row, :used] = 1
        input_ids[row, used:] = 1  # RoBERTa's pad id
    input_ids[:, 0] = 0
    return input_ids, attention_mask


BRIDGETOWER_CONFIGS = [
    # text/vision layers, cross-modal layers, width, heads, vision width (BridgeTower's ViT has 64-wide heads), px, patch
    {"text_layers": 3, "cross_layers": 2, "hidden": 32, "heads": 4, "vision_hidden": 64, "image_size": 32, "patch": 8},
    {"text_layers": 4, "cross_layers": 4, "hidden": 48, "heads": 4, "vision_hidden": 64, "image_size": 48, "patch": 16},
    {
        "text_layers": 2,
        "cross_layers": 1,
        "hidden": 64,
        "heads": 2,
        "vision_hidden": 128,
        "image_size": 32,
        "patch": 16,
    },
]


@pytest.mark.parametrize("spec", BRIDGETOWER_CONFIGS, ids=["3x2-w32", "4x4-w48", "2x1-w64"])
def test_bridge_mode_reproduces_hf_bridgetower(spec):
    bridgetower = _bridgetower(seed=len(spec) + spec["hidden"], **spec)
    model = ManagerTowerModel.from_bridgetower(bridgetower)
    assert model.config.manager_type == "bridge" and not model.training
    input_ids, attention_mask = _text_batch(3, 9, [9, 5, 2], seed=spec["hidden"])
    pixel_values = torch.randn(3, 3, spec["image_size"], spec["image_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = bridgetower(input_ids, attention_mask, pixel_values=pixel_values, output_hidden_states=True)
        got = model(input_ids, attention_mask, pixel_values, output_hidden_states=True)
    for name in ("text_features", "image_features", "pooler_output"):
        assert (got[name] - expected[name]).abs().max().item() <= 1e-5, name
    text_states, image_states, cross_states = expected.hidden_states
    assert len(got.hidden_states[0]) == len(text_states) and len(got.hidden_states[1]) == len(image_states)
    for ours, theirs in zip(got.hidden_states[0], text_states):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    for ours, theirs in zip(got.hidden_states[1], image_states):  # BridgeTower keeps its ViT states sequence-first
        torch.testing.assert_close(ours, theirs.transpose(0, 1), atol=1e-5, rtol=0)
    for (text, image), (their_text, their_image) in zip(got.hidden_states[2], cross_states):
        torch.testing.assert_close(text, their_text, atol=1e-5, rtol=0)
        torch.testing.assert_close(image, their_image, atol=1e-5, rtol=0)


def test_from_bridgetower_rejects_other_shapes_and_variants():
    bridgetower = _bridgetower(seed=0, **BRIDGETOWER_CONFIGS[0])
    config = ManagerTowerModel.from_bridgetower(bridgetower).config
    wider = ManagerTowerConfig(**{**config.to_dict(), "hidden_size": 64, "intermediate_size": 128})
    with pytest.raises(ValueError, match="hidden_size 32 but the given config has 64"):
        ManagerTowerModel.from_bridgetower(bridgetower, config=wider)
    adaptive = ManagerTowerConfig(**{**config.to_dict(), "manager_type": "AAUE"})
    with pytest.raises(ValueError, match="manager_type 'bridge'"):
        ManagerTowerModel.from_bridgetower(bridgetower, config=adaptive)
    scaled = _bridgetower(seed=0, link_tower_type="scaled_add", **BRIDGETOWER_CONFIGS[0])
    with pytest.raises(ValueError, match="link_tower_type='scaled_add'"):
        ManagerTowerModel.from_bridgetower(scaled)
    with pytest.raises(TypeError, match="expected an HF BridgeTowerModel, got RobertaModel"):
        ManagerTowerModel.from_bridgetower(RobertaModel(RobertaConfig(**_TEXT)))


_TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
_VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "patch_size": 8,
}


def test_config_validation_names_the_bad_values():
    with pytest.raises(
        StrictDataclassClassValidationError, match="text encoder has 3 layers but the vision encoder has 4"
    ):
        tiny_config(VOCAB, vision_config={**_VISION, "num_hidden_layers": 4, "image_size": 32})
    with pytest.raises(StrictDataclassClassValidationError, match="image_size 36 is not divisible by patch_size 8"):
        tiny_config(VOCAB, image_size=36)
    with pytest.raises(StrictDataclassClassValidationError, match="unknown manager_type 'dynamic'"):
        tiny_config(VOCAB, manager_type="dynamic")
    with pytest.raises(StrictDataclassClassValidationError, match="needs num_managed_layers >= num_hidden_layers"):
        tiny_config(VOCAB, manager_type="bridge", num_managed_layers=1)
    with pytest.raises(StrictDataclassClassValidationError, match="cross-modal hidden size 30 is not a multiple"):
        tiny_config(VOCAB, hidden_size=30)
    model = ManagerTowerModel(tiny_config(VOCAB))
    with pytest.raises(StrictDataclassClassValidationError, match="image_size 44 is not divisible"):
        set_image_size(model, 44)
    assert model.config.vision_config.image_size == 32  # left unchanged


@pytest.fixture(scope="module")
def adaptive_model():
    torch.manual_seed(0)
    return ManagerTowerModel(tiny_config(VOCAB, manager_type="AAUE")).eval()


def test_aaue_layout_and_save_load_round_trip(adaptive_model, tmp_path):
    managers = adaptive_model.cross_modal_text_managers
    assert isinstance(managers[0], StaticAggregation) and managers[0].previous_norm is None
    assert all(isinstance(manager, AdaptiveAggregation) for manager in managers[1:])
    adaptive_model.save_pretrained(tmp_path)
    loaded = ManagerTowerModel.from_pretrained(tmp_path).eval()
    assert loaded.config.manager_type == "AAUE" and loaded.config.num_managed_layers == 2
    input_ids, attention_mask = _text_batch(2, 6, [6, 3])
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids, attention_mask, pixel_values).pooler_output,
            adaptive_model(input_ids, attention_mask, pixel_values).pooler_output,
        )


def test_static_manager_at_init_is_the_mean_of_layernormed_experts(adaptive_model):
    """Layer 1's input equals mean_n LN(W h_n + type + layer_n), computed here from the encoder's hidden states."""
    model, n = adaptive_model, adaptive_model.config.num_managed_layers
    input_ids, attention_mask = _text_batch(2, 6, [6, 4])
    captured = {}

    def capture(module, args):
        captured["input"] = args[0]

    hook = model.cross_modal_text_layers[0].register_forward_pre_hook(capture)
    with torch.no_grad():
        model(input_ids, attention_mask, torch.randn(2, 3, 32, 32))
        states = model.text_model(input_ids, attention_mask, output_hidden_states=True).hidden_states
        experts = [
            model.cross_modal_text_transform(state)
            + model.token_type_embeddings.weight[0]
            + model.text_layer_embedding.weight[i]
            for i, state in enumerate(states[-n:])
        ]
        expected = torch.stack([F.layer_norm(expert, expert.shape[-1:]) for expert in experts]).mean(dim=0)
    hook.remove()
    torch.testing.assert_close(captured["input"], expected, atol=1e-5, rtol=0)


def test_static_manager_after_the_first_layer_adds_the_normed_previous_output():
    manager = StaticAggregation(num_experts=3, hidden_size=16, eps=1e-5, temperature=1.0, has_previous=True).eval()
    experts, previous = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 16)
    expected = F.layer_norm(experts, (16,)).mean(dim=-2) + F.layer_norm(previous, (16,))
    torch.testing.assert_close(manager(experts, previous=previous), expected, atol=1e-5, rtol=0)


def _adaptive_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 5, 4, 16, generator=generator),
        torch.randn(2, 5, 16, generator=generator),
        torch.randn(2, 7, 16, generator=generator),
    )


def test_adaptive_weights_are_per_token_and_sum_to_one():
    torch.manual_seed(0)
    manager = AdaptiveAggregation(num_experts=4, hidden_size=16, eps=1e-5, temperature=1.0, mask_query=False).eval()
    experts, previous, query = _adaptive_inputs()
    state = manager.previous_norm(previous)
    weights = manager.layer_weights(manager.expert_norm(experts), state, manager.query_norm(query), None)
    assert weights.shape == (2, 5, 4, 1)
    torch.testing.assert_close(weights.sum(dim=-2), torch.ones(2, 5, 1))
    assert (weights[:, 1:] - weights[:, :1]).abs().max() > 1e-3  # tokens get different weights
    expected = (weights * F.layer_norm(experts, (16,))).sum(dim=-2) + state
    torch.testing.assert_close(manager(experts, previous, query), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["static", "adaptive"])
def test_training_noise_only_in_training_mode(kind):
    torch.manual_seed(0)
    if kind == "static":
        manager = StaticAggregation(num_experts=4, hidden_size=16, eps=1e-5, temperature=1.0, has_previous=True)
    else:
        manager = AdaptiveAggregation(num_experts=4, hidden_size=16, eps=1e-5, temperature=1.0, mask_query=False)
    experts, previous, query = _adaptive_inputs()
    manager.eval()
    first, second = manager(experts, previous, query), manager(experts, previous, query)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    manager.train()
    noisy_first, noisy_second = manager(experts, previous, query), manager(experts, previous, query)
    assert (noisy_first - noisy_second).abs().max() > 1e-4
    assert (noisy_first - first).abs().max() > 1e-4


def test_query_mask_makes_image_features_ignore_text_padding():
    """With `manager_query_mask`, appending padding to the texts leaves the image stream unchanged; the reference
    (mask off) lets the adaptive image managers attend over the padding too."""
    input_ids, attention_mask = _text_batch(2, 6, [6, 4])
    padded_ids = torch.cat((input_ids, torch.ones(2, 5, dtype=torch.long)), dim=1)
    padded_mask = torch.cat((attention_mask, torch.zeros(2, 5, dtype=torch.long)), dim=1)
    pixel_values = torch.randn(2, 3, 32, 32)
    for masked in (True, False):
        torch.manual_seed(0)
        model = ManagerTowerModel(tiny_config(VOCAB, manager_query_mask=masked)).eval()
        with torch.no_grad():
            short = model(input_ids, attention_mask, pixel_values).image_features
            long = model(padded_ids, padded_mask, pixel_values).image_features
        difference = (short - long).abs().max().item()
        assert difference <= 1e-5 if masked else difference > 1e-4


def test_base_parameter_count_on_meta():
    """RoBERTa-base + CLIP-ViT-B/16 @ 288 px + 6 cross-modal layers of width 768, AAUE managers.

    The reference's managers hold 12,062,292 parameters (its "+12.06M"); ours hold 12 fewer because each of its 12
    managers also carries a second softmax temperature (`softmax_temperature_cross`) that it never uses. Against
    HF BridgeTower-base (326,347,008) the whole model differs by +11,462,472: the managers, plus the layer
    embeddings of the 6 managed layers per modality (the reference stores 12 rows, using 6), minus the 12 LayerNorms
    of BridgeTower's first layer and link towers that the managers replace, minus the RoBERTa pooler that
    BridgeTower and the reference build but never use (we do not build it).
    """
    with torch.device("meta"):
        model = ManagerTowerModel(ManagerTowerConfig())
        bridgetower = BridgeTowerModel(BridgeTowerConfig())
    d, n, c = 768, 6, 6
    first_static = n * d + 2 * n * d + 1  # scores, per-expert LayerNorms, temperature
    adaptive = 2 * n * d + 2 * d + 2 * d + 2 * (d * d + d) + (2 * d * n + n) + 1 + d
    # expert LNs, previous LN, query LN, attention q/k, controller Linear(2D -> N), temperature, beta
    managers = 2 * (first_static + (c - 1) * adaptive)
    assert managers == 12_062_280 == 12_062_292 - 12
    counted = sum(p.numel() for name, p in model.named_parameters() if "_managers." in name)
    assert counted == managers
    bridgetower_total = sum(p.numel() for p in bridgetower.parameters())
    assert bridgetower_total == 326_347_008
    layer_embeddings, replaced_norms, unused_pooler = 2 * n * d, 2 * c * 2 * d, d * d + d
    total = sum(p.numel() for p in model.parameters())
    assert total - bridgetower_total == managers + layer_embeddings - replaced_norms - unused_pooler == 11_462_472
    assert total == 337_809_480


def test_from_unimodal_pretrained_loads_encoders_and_resizes_positions(tmp_path):
    torch.manual_seed(0)
    text = RobertaModel(RobertaConfig(**_TEXT, max_position_embeddings=40), add_pooling_layer=False)
    vision = CLIPVisionModel(CLIPVisionConfig(**_VISION, image_size=32))
    text.save_pretrained(tmp_path / "text")
    vision.save_pretrained(tmp_path / "vision")
    config = tiny_config(VOCAB, image_size=48)
    model = ManagerTowerModel.from_unimodal_pretrained(str(tmp_path / "text"), str(tmp_path / "vision"), config)
    torch.testing.assert_close(
        model.text_model.encoder.layer[1].output.dense.weight, text.encoder.layer[1].output.dense.weight
    )
    positions = model.vision_model.embeddings.position_embedding.weight
    assert positions.shape == (1 + 6 * 6, 32) and model.config.vision_config.image_size == 48
    torch.testing.assert_close(positions[0], vision.embeddings.position_embedding.weight[0])  # the class position
    with torch.no_grad():
        output = model(*_text_batch(2, 5, [5, 3]), torch.randn(2, 3, 48, 48))
    assert output.image_features.shape == (2, 37, 32)


def test_partial_sub_configs_keep_the_base_defaults(tmp_path):
    config = ManagerTowerConfig(vision_config={"image_size": 576}, text_config={"num_hidden_layers": 12})
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (576, 16)
    assert config.vision_config.hidden_act == "quick_gelu" and config.text_config.vocab_size == 50265
    config.save_pretrained(tmp_path)
    assert ManagerTowerConfig.from_pretrained(tmp_path).vision_config.to_dict() == config.vision_config.to_dict()
