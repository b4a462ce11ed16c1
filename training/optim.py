"""Optimizer parameter groups from a table of named groups: name patterns and a learning-rate multiplier each.

Model-agnostic: LLaVA's parts (vision tower, projector, manager, language model) and ManagerTower's (cross-modal
layers at 5x, heads at 5-50x) are both one table.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class GroupRule:
    """Parameters whose name contains any of `patterns` (empty: every parameter no earlier rule took)."""

    name: str
    patterns: tuple[str, ...] = ()
    lr_multiplier: float = 1.0

    def matches(self, parameter_name: str) -> bool:
        return not self.patterns or any(pattern in parameter_name for pattern in self.patterns)


def group_of(parameter_name: str, rules: Sequence[GroupRule]) -> GroupRule:
    """The first rule that takes `parameter_name` (rules with patterns first, then a catch-all)."""
    ordered = sorted(rules, key=lambda rule: not rule.patterns)
    for rule in ordered:
        if rule.matches(parameter_name):
            return rule
    raise ValueError(
        f"parameter {parameter_name!r} matches no group of {[rule.name for rule in rules]} (add a catch-all)"
    )


def param_groups(
    model: nn.Module,
    rules: Sequence[GroupRule],
    base_lr: float,
    weight_decay: float = 0.0,
    decay_names: Collection[str] | None = None,
) -> list[dict]:
    """Optimizer groups of the trainable parameters: one per rule and decay setting, `lr = base_lr * multiplier`.

    Each group carries its rule's `name` (kept by torch optimizers and DeepSpeed), so learning rates can be logged per
    group. `decay_names` are the parameters that get `weight_decay` (all when None).
    """
    names = [rule.name for rule in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"group names must be unique, got {names}")
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for parameter_name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decays = weight_decay > 0 and (decay_names is None or parameter_name in decay_names)
        buckets.setdefault((group_of(parameter_name, rules).name, decays), []).append(parameter)
    by_name = {rule.name: rule for rule in rules}
    return [
        {
            "name": name,
            "params": parameters,
            "lr": base_lr * by_name[name].lr_multiplier,
            "weight_decay": weight_decay if decays else 0.0,
        }
        for (name, decays), parameters in buckets.items()
    ]
