"""The managers of ManagerTower: what each cross-modal layer takes as input, per modality.

A manager sees `experts` `(B, L, N, D)`: the top N uni-modal layers of its modality, projected to the cross-modal
width and carrying their modality-type (and layer) embeddings. After the first cross-modal layer it also sees
`previous` `(B, L, D)`, the previous cross-modal output of its own modality, and `query` `(B, L', D)`, that of the
other modality (with `query_mask` `(B, L')`). It returns the cross-modal layer input `(B, L, D)`.

Adding a manager type is one entry in `MANAGER_TOWER_TYPES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..managers import QueryAttention
from ..ops import expert_layer_norm, softmax_layer_weights, weighted_layer_sum

if TYPE_CHECKING:
    from .configuration_managertower import ManagerTowerConfig


class ExpertLayerNorm(nn.Module):
    """One LayerNorm per expert, applied to all experts at once: weight and bias are (N, D)."""

    def __init__(self, num_experts: int, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, experts: torch.Tensor) -> torch.Tensor:
        return expert_layer_norm(experts, self.weight, self.bias, self.eps)


class StaticAggregation(nn.Module):
    """SAUE: `sum_n softmax_n((s + noise) / tau) * LN_n(E_n)`, plus `beta * LN(C_{l-1})` after the first layer.

    The scores `s` are (N, D), initialised to 1/N, so at initialisation (in eval mode) the manager returns the mean
    of the LayerNorm'd experts. The Gaussian noise N(0, (1/N)^2) is drawn per token and channel, in training only.
    """

    def __init__(self, num_experts: int, hidden_size: int, eps: float, temperature: float, has_previous: bool):
        super().__init__()
        self.num_experts = num_experts
        self.expert_norm = ExpertLayerNorm(num_experts, hidden_size, eps)
        self.layer_scores = nn.Parameter(torch.full((num_experts, hidden_size), 1.0 / num_experts))
        self.temperature = nn.Parameter(torch.full((1,), float(temperature)))
        self.previous_norm = nn.LayerNorm(hidden_size, eps=eps) if has_previous else None
        self.previous_scale = nn.Parameter(torch.ones(hidden_size)) if has_previous else None

    def layer_weights(self, experts: torch.Tensor) -> torch.Tensor:
        """The weights of each expert: (N, D) in eval mode, per token (B, L, N, D) with training noise."""
        scores = self.layer_scores.expand_as(experts) if self.training else self.layer_scores
        return softmax_layer_weights(scores, self.temperature, noise_std=1.0 / self.num_experts, training=self.training)

    def forward(
        self,
        experts: torch.Tensor,
        previous: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_previous(previous, self.previous_norm is not None)
        experts = self.expert_norm(experts)
        output = weighted_layer_sum(experts, self.layer_weights(experts))
        if self.previous_norm is not None:
            output = output + self.previous_scale * self.previous_norm(previous)
        return output


class AdaptiveAggregation(nn.Module):
    """AAUE: per-token expert weights `softmax_n((W [A . Q ; C_hat] + noise) / tau)`, plus `beta * C_hat`.

    `C_hat = LN(C_{l-1})` of this modality, `Q = LN(C'_{l-1})` of the other one, and `A` a one-head attention of
    `C_hat` over `Q` with no value projection; `W` is a `Linear(2D -> N)`.
    """

    def __init__(self, num_experts: int, hidden_size: int, eps: float, temperature: float, mask_query: bool):
        super().__init__()
        self.num_experts = num_experts
        self.mask_query = mask_query
        self.expert_norm = ExpertLayerNorm(num_experts, hidden_size, eps)
        self.previous_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.query_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.query_attention = QueryAttention(hidden_size)
        self.controller = nn.Linear(2 * hidden_size, num_experts)
        self.temperature = nn.Parameter(torch.full((1,), float(temperature)))
        self.previous_scale = nn.Parameter(torch.ones(hidden_size))

    def layer_weights(
        self, experts: torch.Tensor, state: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-token weights of each expert: (B, L, N, 1) in eval mode, (B, L, N, D) with training noise."""
        if query_mask is None or not self.mask_query:
            query_mask = torch.ones(query.shape[:2], dtype=torch.bool, device=query.device)
        readout = self.query_attention(state, query, query_mask.bool())
        scores = self.controller(torch.cat((readout, state), dim=-1))[..., None]  # (B, L, N, 1)
        if self.training:
            # The reference draws its noise per channel, as for the static scores.
            scores = scores.expand_as(experts)
        return softmax_layer_weights(scores, self.temperature, noise_std=1.0 / self.num_experts, training=self.training)

    def forward(
        self,
        experts: torch.Tensor,
        previous: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if previous is None or query is None:
            raise ValueError("an adaptive manager needs the previous cross-modal outputs of both modalities")
        experts = self.expert_norm(experts)
        state = self.previous_norm(previous)
        weights = self.layer_weights(experts, state, self.query_norm(query), query_mask)
        return weighted_layer_sum(experts, weights) + self.previous_scale * state


class BridgeLink(nn.Module):
    """BridgeTower: a one-hot manager that takes expert `expert_index` alone, `LN(E_k [+ C_{l-1}])`."""

    def __init__(self, expert_index: int, hidden_size: int, eps: float, has_previous: bool) -> None:
        super().__init__()
        self.expert_index = expert_index
        self.has_previous = has_previous
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(
        self,
        experts: torch.Tensor,
        previous: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_previous(previous, self.has_previous)
        selected = experts[..., self.expert_index, :]
        return self.norm(selected if previous is None else selected + previous)


def _check_previous(previous: torch.Tensor | None, expected: bool) -> None:
    if (previous is not None) != expected:
        state = "needs" if expected else "takes no"
        raise ValueError(
            f"this manager {state} previous cross-modal output (got {'none' if previous is None else 'one'})"
        )


def _static(config: ManagerTowerConfig, layer: int) -> nn.Module:
    return StaticAggregation(
        config.num_managed_layers,
        config.hidden_size,
        config.layer_norm_eps,
        config.manager_temperature,
        has_previous=layer > 0,
    )


def _adaptive(config: ManagerTowerConfig, layer: int) -> nn.Module:
    if layer == 0:
        # The first cross-modal layer has no previous output to query with, so the reference uses a static one.
        return _static(config, layer)
    return AdaptiveAggregation(
        config.num_managed_layers,
        config.hidden_size,
        config.layer_norm_eps,
        config.manager_temperature,
        config.manager_query_mask,
    )


def _bridge(config: ManagerTowerConfig, layer: int) -> nn.Module:
    # Cross-modal layer l (0-based) reads uni-modal layer L - C + 1 + l, i.e. expert l + N - C of the top N.
    expert_index = layer + config.num_managed_layers - config.num_hidden_layers
    return BridgeLink(expert_index, config.hidden_size, config.layer_norm_eps, has_previous=layer > 0)


@dataclass(frozen=True)
class ManagerType:
    """How to build the manager of cross-modal layer `layer`, and whether experts carry a layer embedding."""

    build: Callable[[ManagerTowerConfig, int], nn.Module]
    layer_embedding: bool


MANAGER_TOWER_TYPES: dict[str, ManagerType] = {
    "SAUE": ManagerType(build=_static, layer_embedding=True),
    "AAUE": ManagerType(build=_adaptive, layer_embedding=True),
    "bridge": ManagerType(build=_bridge, layer_embedding=False),
}


def build_managers(config: ManagerTowerConfig) -> nn.ModuleList:
    """One manager per cross-modal layer, for one modality."""
    spec = MANAGER_TOWER_TYPES[config.manager_type]
    return nn.ModuleList(spec.build(config, layer) for layer in range(config.num_hidden_layers))
