"""The ManagerTower Trainer: the reference's optimiser (AdamW whose parameter groups scale the base learning rate by
name) and random draws in the forward that do not depend on how a global batch is split over ranks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback


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


def micro_batch_seed(seed: int, step: int, micro_step: int, accumulation: int, rank: int, world_size: int) -> int:
    """The seed of the random draws of one micro-batch: a function of its per-device batch's place in the run's order.

    The data loader deals per-device batches to the ranks in turn, so micro-batch `micro_step` of optimiser step
    `step` on `rank` holds per-device batch `(step * accumulation + micro_step) * world_size + rank`: the same batch,
    hence the same seed, whether a global batch is split over ranks or over accumulation steps.
    """
    return seed * 2**32 + (step * accumulation + micro_step) * world_size + rank


class _EpochToDataset(TrainerCallback):
    """Tells the training dataset each epoch as it begins, so its per-sample draws are new every epoch (accelerate's
    loader forwards `set_epoch` to the dataset only when its sampler has none)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self.dataset.set_epoch(int(state.epoch or 0))


class ManagerTowerTrainer(Trainer):
    """HF `Trainer` whose optimiser applies the recipe's learning-rate multipliers (works under DeepSpeed too), and
    whose forward passes draw their noise from a generator seeded per micro-batch (`micro_batch_seed`).

    The managers add Gaussian noise to their layer scores in training, as the reference, and the pre-training and
    retrieval heads draw ITM labels and hard negatives in the forward. Drawn from each process's own generator, these
    depended on the world size (a rank's first micro-batch drew what one process draws for its first, not for the
    batch it holds) and every rank drew the same noise for different samples (all ranks share `args.seed`).
    """

    def __init__(self, *args, lr_multipliers: Mapping[str, float], no_decay: Sequence[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lr_multipliers = dict(lr_multipliers)
        self.no_decay = list(no_decay)
        self._seeded_step, self._micro_step = -1, 0
        if hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(_EpochToDataset(self.train_dataset))

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """One micro-batch's forward and backward under its own seed; the process's generators are left as they were."""
        step = self.state.global_step
        if step != self._seeded_step:
            self._seeded_step, self._micro_step = step, 0
        seed = micro_batch_seed(
            self.args.seed,
            step,
            self._micro_step,
            self.args.gradient_accumulation_steps,
            self.args.process_index,
            self.args.world_size,
        )
        self._micro_step += 1
        device = self.args.device
        # Gradient checkpointing recomputes the forward in the backward: its saved generator state is this seed's.
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            torch.manual_seed(seed)
            return super().training_step(model, inputs, num_items_in_batch)

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
