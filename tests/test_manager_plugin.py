"""The manager plugin alone: config validation and resolution, the managers' arithmetic, the layer-0 rule."""

from __future__ import annotations

import math

import pytest
import torch

from manager_plugin import AdaptiveManager, LayerManagers, ManagerConfig, StaticManager
from manager_plugin.ops import multiplicative_jitter

# LLaVA-OneVision-0.5B: SigLIP with 26 blocks (27 hidden states, main feature = the last), Qwen2 with 24 layers.
OV_05B = {"num_vision_hidden_states": 27, "main_vision_layer": -1, "num_decoder_layers": 24, "hidden_size": 896}


def test_defaults_resolve_to_the_paper_setting():
    config = ManagerConfig().resolve(**OV_05B)
    assert config.vision_layers == list(range(13, 26))
    assert config.injection_layers == [0, 4, 8, 12, 16, 20]
    assert (config.manager_type, config.grid_type, config.jitter) == ("static", "all", 0.01)
    assert config.hidden_size == 896


def test_parameter_count_at_the_05b_defaults_matches_the_paper():
    with torch.device("meta"):
        managers = LayerManagers(ManagerConfig().resolve(**OV_05B))
    weights = sum(p.numel() for name, p in managers.named_parameters() if name.startswith("managers."))
    embedding = managers.layer_embedding.weight.numel()
    # 6 managers x 13 layers x 896, one 896 row fewer at decoder layer 0; plus a 13 x 896 layer embedding.
    assert (weights, embedding) == (68_992, 11_648)
    assert weights + embedding == 80_640  # the paper: 893.62M -> 893.70M


def test_config_json_round_trip(tmp_path):
    config = ManagerConfig(
        vision_layers=[2, 4, 5],
        injection_layers=[1, 3],
        manager_type="adaptive_cross",
        grid_type="main",
        jitter=0.02,
        hidden_size=64,
    )
    config.save(tmp_path)
    assert ManagerConfig.load(tmp_path) == config
    assert ManagerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"manager_type": "dynamic"}, "unknown manager_type 'dynamic'"),
        ({"grid_type": "tiles"}, "unknown grid_type 'tiles'"),
        ({"vision_layers": [5, 3]}, "strictly increasing"),
        ({"vision_layers": [-1, 3]}, "non-negative"),
        ({"injection_layers": []}, "must not be empty"),
        ({"jitter": 1.5}, "jitter must be a number in [0, 1)"),
        ({"vision_layers": [3], "injection_layers": [0, 2]}, "at least 2 vision_layers"),
    ],
)
def test_invalid_configs_are_rejected_with_the_value(kwargs, message):
    with pytest.raises(
        (ValueError, TypeError), match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        ManagerConfig(**kwargs)


def test_unknown_fields_are_rejected():
    with pytest.raises(ValueError, match=r"unknown ManagerConfig fields \['mm_manager_type'\]"):
        ManagerConfig.from_dict({"mm_manager_type": "static"})


def test_resolve_names_out_of_range_layers():
    with pytest.raises(ValueError, match=r"vision layer 40 out of range: the tower has 27 hidden states \(0..26\)"):
        ManagerConfig(vision_layers=[13, 40]).resolve(**OV_05B)
    with pytest.raises(ValueError, match=r"injection layer 24 out of range: .* 24 decoder layers \(0..23\)"):
        ManagerConfig(injection_layers=[0, 24]).resolve(**OV_05B)
    with pytest.raises(ValueError, match="hidden_size 1024 does not match the model: .* hidden size 896"):
        ManagerConfig(hidden_size=1024).resolve(**OV_05B)


def test_static_manager_is_zero_at_init_and_a_per_channel_weighted_sum():
    manager = StaticManager(num_experts=3, hidden_size=8).eval()
    experts = torch.randn(2, 5, 3, 8)
    assert torch.equal(manager(experts), torch.zeros(2, 5, 8))
    torch.nn.init.normal_(manager.layer_weights)
    w = manager.layer_weights.detach()
    expected = w[0] * experts[..., 0, :] + w[1] * experts[..., 1, :] + w[2] * experts[..., 2, :]
    torch.testing.assert_close(manager(experts), expected, rtol=1e-6, atol=1e-6)


def test_jitter_is_multiplicative_bounded_and_only_in_training():
    manager = StaticManager(num_experts=1, hidden_size=4096, jitter=0.01)
    torch.nn.init.constant_(manager.layer_weights, 2.0)
    experts = torch.ones(1, 1, 4096)
    manager.eval()
    assert torch.equal(manager(experts), torch.full((1, 4096), 2.0))
    manager.train()
    factors = manager(experts) / 2.0
    assert factors.min() >= 0.99 - 1e-6 and factors.max() <= 1.01 + 1e-6
    assert factors.std() > 1e-3  # elementwise noise, not one shared factor
    assert not torch.equal(manager(experts), manager(experts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_jitter_has_mean_one_in_every_dtype(dtype):
    """Noise drawn in bf16 would take 4 values at or below 1 (mean 0.994): a shrink evaluation does not have."""
    torch.manual_seed(0)
    weights = (torch.rand(1_000_000) + 0.5).to(dtype)
    factors = multiplicative_jitter(weights, 0.01).float() / weights.float()
    assert abs(factors.mean().item() - 1.0) < 2e-4  # fp32 noise alone: std 0.01 / sqrt(3 * 1e6) = 6e-6
    assert factors.max() > 1.005 and factors.min() < 0.995  # spread both ways, not collapsed onto 1
    assert factors.max() <= 1.01 * (1 + 2**-8) and factors.min() >= 0.99 * (1 - 2**-8)  # bounded up to rounding


def test_adaptive_manager_matches_its_formula():
    torch.manual_seed(0)
    manager = AdaptiveManager(num_experts=3, hidden_size=8).eval()
    experts, state = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 8)
    assert torch.equal(manager(experts, state=state), torch.zeros(2, 5, 8))
    torch.nn.init.normal_(manager.gate)
    scores = state @ manager.controller.weight.detach().T  # (2, 5, 3): per-token layer scores
    gate = manager.gate.detach()
    expected = sum(scores[..., n, None] * gate[n] * experts[..., n, :] for n in range(3))
    torch.testing.assert_close(manager(experts, state=state), expected, rtol=1e-5, atol=1e-6)


def _query_readout(manager, query_type, state_rows, valid):
    """The query summary each state row reads, computed from the kept query tokens `valid` (in order)."""
    rows, hidden = state_rows.shape
    if query_type == "last":
        return valid[-1].expand(rows, hidden)
    if query_type == "average":
        return valid.mean(0).expand(rows, hidden)
    attention = manager.query_attention
    q = state_rows @ attention.q_proj.weight.T + attention.q_proj.bias
    k = valid @ attention.k_proj.weight.T + attention.k_proj.bias
    return torch.softmax(q @ k.T / math.sqrt(hidden), dim=-1) @ valid


PREFIX_MASK = [[True, True, True, False, False], [True, False, False, False, False]]
# Not prefixes: the kept tokens have gaps and the last kept token is not at index count - 1.
SCATTERED_MASK = [[False, True, False, True, False], [False, False, True, False, True]]


@pytest.mark.parametrize("mask", [PREFIX_MASK, SCATTERED_MASK], ids=["prefix", "scattered"])
@pytest.mark.parametrize("query_type", ["last", "average", "cross"])
def test_adaptive_query_variants_match_their_formula(query_type, mask):
    torch.manual_seed(1)
    hidden = 8
    manager = AdaptiveManager(num_experts=2, hidden_size=hidden, query_type=query_type).eval()
    torch.nn.init.normal_(manager.gate)
    experts, state = torch.randn(2, 3, 2, hidden), torch.randn(2, 3, hidden)
    query = torch.randn(2, 5, hidden)
    query_mask = torch.tensor(mask)
    out = manager(experts, state=state, query=query, query_mask=query_mask)

    for b in range(2):
        readout = _query_readout(manager, query_type, state[b], query[b][query_mask[b]])
        scores = torch.cat([readout, state[b]], dim=-1) @ manager.controller.weight.detach().T
        expected = sum(scores[:, n, None] * manager.gate.detach()[n] * experts[b, :, n] for n in range(2))
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("query_type", ["last", "average", "cross"])
def test_per_token_query_masks_equal_separate_rows(query_type):
    """Two samples flattened into one row, each token reading its own sample's query tokens, equal the padded rows."""
    torch.manual_seed(2)
    hidden = 8
    manager = AdaptiveManager(num_experts=2, hidden_size=hidden, query_type=query_type).eval()
    torch.nn.init.normal_(manager.gate)
    experts, state, query = torch.randn(2, 3, 2, hidden), torch.randn(2, 3, hidden), torch.randn(2, 5, hidden)
    query_mask = torch.tensor(SCATTERED_MASK)
    per_row = manager(experts, state=state, query=query, query_mask=query_mask)
    token_sample, query_sample = torch.arange(2).repeat_interleave(3), torch.arange(2).repeat_interleave(5)
    per_token = (token_sample[:, None] == query_sample[None, :]) & query_mask.reshape(1, -1)
    flat = manager(
        experts.reshape(1, 6, 2, hidden),
        state=state.reshape(1, 6, hidden),
        query=query.reshape(1, 10, hidden),
        query_mask=per_token[None],
    )
    torch.testing.assert_close(flat.reshape(2, 3, hidden), per_row, rtol=1e-5, atol=1e-6)


def test_layer_zero_manager_is_static_and_ignores_the_last_selected_layer():
    config = ManagerConfig(vision_layers=[1, 2, 3], injection_layers=[0, 2], manager_type="adaptive", hidden_size=8)
    managers = LayerManagers(config).eval()
    assert isinstance(managers.managers[0], StaticManager) and managers.managers[0].num_experts == 2
    assert isinstance(managers.managers[1], AdaptiveManager) and managers.managers[1].num_experts == 3
    for parameter in managers.parameters():
        torch.nn.init.normal_(parameter)
    experts, state = torch.randn(4, 3, 8), torch.randn(4, 8)
    changed = experts.clone()
    changed[:, -1] += 1.0
    assert torch.equal(managers(0, experts), managers(0, changed))
    assert not torch.allclose(
        managers(2, experts[None], state=state[None]), managers(2, changed[None], state=state[None])
    )


def test_static_deltas_layer_by_layer_equal_each_injection_layers_weighted_sum():
    config = ManagerConfig(vision_layers=[1, 2, 3, 4], injection_layers=[0, 2, 5], hidden_size=8)
    managers = LayerManagers(config).eval()
    for manager in managers.managers:
        torch.nn.init.normal_(manager.layer_weights)
    experts = torch.randn(6, 4, 8)
    deltas = managers.static_deltas(iter(experts.unbind(1)))  # one (tokens, D) layer at a time
    assert sorted(deltas) == [0, 2, 5]
    for manager, layer in zip(managers.managers, config.injection_layers):
        used = 3 if layer == 0 else 4  # decoder layer 0 reads every selected layer but the last
        expected = (experts[:, :used] * manager.layer_weights.detach()).sum(dim=1)
        torch.testing.assert_close(deltas[layer], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="static managers at inference"):
        managers.train().static_deltas(iter(experts.unbind(1)))
