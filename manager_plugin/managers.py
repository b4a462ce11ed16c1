"""Zero-initialised managers: they add `sum_n w_n * expert_n` to a stream and start out adding exactly zero.

A manager sees `experts` of shape `(..., N, D)` (N stacked expert layers) and returns `(..., D)`. Adaptive managers
also see the stream's current `state` `(B, L, D)` at those tokens and, for the query variants, `query` tokens
`(B, Q, D)` with a boolean `query_mask`: `(B, Q)` (every token of a row reads the same query tokens) or `(B, L, Q)`
(each token its own, e.g. the tokens of several samples flattened into one row, each reading its sample's query).

Adding a variant is one entry in `MANAGER_TYPES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .ops import accumulated_layer_sum, multiplicative_jitter, weighted_layer_sum


class Manager(nn.Module):
    """`sum_n w_n * experts_n`, with weights `w` (broadcastable to the experts) jittered elementwise in training.

    Subclasses say how the weights are made (`expert_weights`); they start at zero, so a new manager adds nothing.
    """

    def __init__(self, num_experts: int, jitter: float) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.jitter = jitter

    def expert_weights(
        self, state: torch.Tensor | None, query: torch.Tensor | None, query_mask: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def check_experts(self, experts: torch.Tensor) -> None:
        """Refuse experts that are not `(..., num_experts, hidden)`."""
        if experts.dim() < 2 or experts.shape[-2] != self.num_experts:
            raise ValueError(f"expected experts of shape (..., {self.num_experts}, hidden), got {tuple(experts.shape)}")

    def forward(
        self,
        experts: torch.Tensor,
        state: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_experts(experts)
        if not self.training:
            return self.inference_sum(experts, state, query, query_mask)
        # Training: jittered weights, and the product then sum that trains fastest (ops.weighted_layer_sum).
        weights = multiplicative_jitter(self.expert_weights(state, query, query_mask), self.jitter)
        return weighted_layer_sum(experts, weights)

    def inference_sum(
        self,
        experts: torch.Tensor,
        state: torch.Tensor | None,
        query: torch.Tensor | None,
        query_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The weighted sum without jitter; subclasses sum layer by layer without materialising `(..., N, D)`."""
        return weighted_layer_sum(experts, self.expert_weights(state, query, query_mask))


class StaticManager(Manager):
    """Per-layer, per-channel weights `w` of shape (N, D), initialised to zero."""

    def __init__(self, num_experts: int, hidden_size: int, jitter: float = 0.01) -> None:
        super().__init__(num_experts, jitter)
        self.layer_weights = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.layer_weights)

    def expert_weights(self, state=None, query=None, query_mask=None) -> torch.Tensor:
        return self.layer_weights

    def inference_sum(self, experts: torch.Tensor, state=None, query=None, query_mask=None) -> torch.Tensor:
        return accumulated_layer_sum(experts, self.layer_weights)


class QueryAttention(nn.Module):
    """One-head scaled dot-product attention of the state over query tokens, with no value projection."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, state: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        scores = self.q_proj(state) @ self.k_proj(query).transpose(-1, -2) / math.sqrt(self.q_proj.out_features)
        scores = scores.masked_fill(~_per_token(query_mask), torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1) @ query


def _per_token(query_mask: torch.Tensor) -> torch.Tensor:
    """A `(B, Q)` query mask as `(B, 1, Q)`, broadcastable like a per-token `(B, L, Q)` one."""
    return query_mask[:, None, :] if query_mask.dim() == 2 else query_mask


def _last_query(state: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """The last query token the mask keeps (by position, whatever the mask's shape: not its count of tokens)."""
    mask = _per_token(query_mask)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, positions, 0).amax(dim=-1)  # (B, 1 or L); an empty mask picks token 0
    picked = query.gather(1, last[..., None].expand(-1, -1, query.shape[-1]))
    return picked.expand_as(state)


def _average_query(state: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    mask = _per_token(query_mask).to(query.dtype)
    mean = (mask @ query) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return mean.expand_as(state)


class AdaptiveManager(Manager):
    """Per-token layer scores from a bias-free linear controller, times a zero-initialised gate (N, D).

    `query_type` None scores each token from its own state; "last", "average" and "cross" concatenate a summary of
    the query tokens (the last one, their mean, or an attention read-out) before the state, as in the reference.
    """

    def __init__(self, num_experts: int, hidden_size: int, jitter: float = 0.01, query_type: str | None = None):
        if query_type not in QUERY_TYPES:
            raise ValueError(f"unknown query_type {query_type!r}: expected one of {QUERY_TYPES}")
        super().__init__(num_experts, jitter)
        self.query_type = query_type
        self.query_attention = QueryAttention(hidden_size) if query_type == "cross" else None
        in_features = hidden_size if query_type is None else 2 * hidden_size
        self.controller = nn.Linear(in_features, num_experts, bias=False)
        self.gate = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def reset_parameters(self) -> None:
        self.controller.reset_parameters()
        if self.query_attention is not None:
            self.query_attention.q_proj.reset_parameters()
            self.query_attention.k_proj.reset_parameters()
        nn.init.zeros_(self.gate)

    def expert_weights(
        self, state: torch.Tensor | None, query: torch.Tensor | None, query_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-token weights `(..., N, D)`: the controller's layer scores times the gate."""
        return self.layer_scores(state, query, query_mask)[..., None] * self.gate

    def inference_sum(
        self,
        experts: torch.Tensor,
        state: torch.Tensor | None,
        query: torch.Tensor | None,
        query_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """`sum_n s_n * (gate_n * experts_n)` layer by layer, never a `(tokens, N, D)` weight or product tensor (training
        materialises the per-token weights: the jitter perturbs each)."""
        scores = self.layer_scores(state, query, query_mask).to(experts.dtype)
        gate = self.gate.to(experts.dtype)
        out = scores[..., 0, None] * (gate[0] * experts[..., 0, :])
        for n in range(1, self.num_experts):
            out = out + scores[..., n, None] * (gate[n] * experts[..., n, :])
        return out

    def layer_scores(
        self, state: torch.Tensor | None, query: torch.Tensor | None, query_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-token layer scores `(..., N)` of the controller, from the state and the query's summary."""
        if state is None:
            raise ValueError("an adaptive manager needs the stream's state at the managed tokens")
        controller_input = state
        if self.query_type is not None:
            if query is None:
                # No query tokens given: the managed tokens serve as their own query, as the reference does.
                query = state
                query_mask = torch.ones(state.shape[:2], dtype=torch.bool, device=state.device)
            elif query_mask is None:
                query_mask = torch.ones(query.shape[:2], dtype=torch.bool, device=query.device)
            if self.query_attention is not None:
                readout = self.query_attention(state, query, query_mask)
            else:
                readout = _POOLED_QUERY[self.query_type](state, query, query_mask)
            controller_input = torch.cat((readout, state), dim=-1)
        return self.controller(controller_input)


QUERY_TYPES = (None, "last", "average", "cross")
_POOLED_QUERY = {"last": _last_query, "average": _average_query}

ManagerFactory = Callable[[int, int, float], nn.Module]

MANAGER_TYPES: dict[str, ManagerFactory] = {
    "static": lambda n, d, jitter: StaticManager(n, d, jitter),
    "adaptive": lambda n, d, jitter: AdaptiveManager(n, d, jitter, query_type=None),
    "adaptive_last": lambda n, d, jitter: AdaptiveManager(n, d, jitter, query_type="last"),
    "adaptive_average": lambda n, d, jitter: AdaptiveManager(n, d, jitter, query_type="average"),
    "adaptive_cross": lambda n, d, jitter: AdaptiveManager(n, d, jitter, query_type="cross"),
}


def build_manager(manager_type: str, num_experts: int, hidden_size: int, jitter: float = 0.01) -> nn.Module:
    """The manager registered under `manager_type`."""
    if manager_type not in MANAGER_TYPES:
        raise ValueError(f"unknown manager_type {manager_type!r}: expected one of {sorted(MANAGER_TYPES)}")
    return MANAGER_TYPES[manager_type](num_experts, hidden_size, jitter)
