"""The reference's optimiser: AdamW whose parameter groups scale the base learning rate by name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn
from transformers import Trainer


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    lr_multipliers: Mapping[str, float],
    no_decay: Sequence[str],
) -> list[dict]:
    """Trainable parameters grouped by (learning rate, weight decay).

    A parameter's multiplier is that of the first key of `lr_multipliers` (in order) found in its name, else 1; it
    gets no weight decay if its name contains any of `no_decay`.
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        multiplier = next((float(value) for key, value in lr_multipliers.items() if key in name), 1.0)
        decay = not any(pattern in name for pattern in no_decay)
        groups.setdefault((multiplier, decay), []).append(parameter)
    return [
        {"params": params, "lr": learning_rate * multiplier, "weight_decay": weight_decay if decay else 0.0}
        for (multiplier, decay), params in sorted(groups.items())
    ]


class ManagerTowerTrainer(Trainer):
    """HF `Trainer` whose optimiser applies the recipe's learning-rate multipliers (works under DeepSpeed too)."""

    def __init__(self, *args, lr_multipliers: Mapping[str, float], no_decay: Sequence[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lr_multipliers = dict(lr_multipliers)
        self.no_decay = list(no_decay)

    def create_optimizer(self, model: nn.Module | None = None):
        if self.optimizer is None:
            groups = parameter_groups(
                model if model is not None else self.model,
                self.args.learning_rate,
                self.args.weight_decay,
                self.lr_multipliers,
                self.no_decay,
            )
            optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_class(groups, **optimizer_kwargs)
        return self.optimizer
