"""`LayerManagers`: the managers of one language model, one per injection layer, plus the vision-layer embedding.

This is the manager of the MLLM path (LLaVA-OV-Manager) with no knowledge of any model: it receives the projected
vision layers of the managed tokens and returns what to add to the stream entering a given decoder layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .config import ManagerConfig
from .managers import StaticManager, build_manager
from .ops import fold_layer


class LayerEmbedding(nn.Module):
    """A learned vector per expert layer, added to that layer's features (init N(0, 1/D))."""

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=1.0 / self.weight.shape[-1] ** 0.5)

    def forward(self, experts: torch.Tensor) -> torch.Tensor:
        """`experts` `(..., N, D)` plus the embedding of each layer."""
        return experts + self.weight.to(experts.dtype)


class LayerManagers(nn.Module):
    """One manager per injection layer of a resolved `ManagerConfig`.

    The layer-0 rule of the reference: the manager at decoder layer 0 aggregates every selected vision layer but the
    last one, and it is always static (the reference defines no adaptive manager there).
    """

    def __init__(self, config: ManagerConfig) -> None:
        super().__init__()
        if not config.is_resolved:
            raise ValueError(f"LayerManagers needs a resolved ManagerConfig (call resolve() first), got {config}")
        self.config = config
        hidden = config.hidden_size
        self.layer_embedding = LayerEmbedding(len(config.vision_layers), hidden)
        self.managers = nn.ModuleList(
            build_manager(
                "static" if layer == 0 else config.manager_type, config.num_experts(layer), hidden, config.jitter
            )
            for layer in config.injection_layers
        )
        self._slot = {layer: slot for slot, layer in enumerate(config.injection_layers)}

    def reset_parameters(self) -> None:
        self.layer_embedding.reset_parameters()
        for manager in self.managers:
            manager.reset_parameters()

    @property
    def needs_state(self) -> bool:
        """Whether any manager reads the stream's state (adaptive managers), not only the expert layers."""
        return not all(isinstance(manager, StaticManager) for manager in self.managers)

    @property
    def reads_query(self) -> bool:
        """Whether any manager reads query tokens (adaptive_last / average / cross), not only the managed tokens."""
        return any(getattr(manager, "query_type", None) is not None for manager in self.managers)

    @property
    def sums_layer_by_layer(self) -> bool:
        """Whether `static_deltas` applies: static managers, at inference, their weights at hand (reading them outside
        the managers' forwards is not safe under ZeRO-3, which gathers them only there)."""
        partitioned = any(hasattr(parameter, "ds_id") for parameter in self.parameters())
        return not (self.needs_state or self.training or partitioned)

    def static_deltas(self, expert_layers: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
        """What every injection layer adds, from the N expert layers `(..., D)` given one at a time, in order (static
        managers, inference): each layer is folded into the sums of the managers that read it and can then be dropped,
        so the `(..., N, D)` stack is never built. Equals `self(layer, stack)` of every injection layer."""
        if not self.sums_layer_by_layer:
            raise RuntimeError(
                "static_deltas serves static managers at inference (no jitter, no stream state, no ZeRO-3 partitions)"
            )
        deltas: dict[int, torch.Tensor] = {}
        for n, expert in enumerate(expert_layers):
            for layer, manager in zip(self.config.injection_layers, self.managers):
                if n < manager.num_experts:  # decoder layer 0 reads every layer but the last
                    deltas[layer] = fold_layer(deltas.get(layer), expert, manager.layer_weights[n])
        return deltas

    def forward(
        self,
        injection_layer: int,
        experts: torch.Tensor,
        state: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the manager of `injection_layer` adds at the managed tokens; `experts` holds all N layers."""
        manager = self.managers[self._slot[injection_layer]]
        if injection_layer == 0:
            experts = experts[..., :-1, :]
        return manager(experts, state=state, query=query, query_mask=query_mask)
