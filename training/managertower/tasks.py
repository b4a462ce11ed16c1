"""The tasks: which head trains, whether samples carry a false image, and how the task is scored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from manager_plugin.managertower import TASK_HEADS, ManagerTowerHeadModel

from .collators import TaskCollator
from .datasets import TaskDataset
from .evaluate import evaluate_accuracy, evaluate_pretrain, evaluate_retrieval, evaluate_vqa

Evaluator = Callable[[ManagerTowerHeadModel, TaskDataset, TaskCollator, int, int], dict[str, float]]


def _over_batches(metric: Callable[[torch.nn.Module, DataLoader], dict[str, float]]) -> Evaluator:
    def evaluate(model, dataset, collator, batch_size, k_test):
        return metric(model, DataLoader(dataset, batch_size=batch_size, collate_fn=collator))

    return evaluate


@dataclass(frozen=True)
class Task:
    """A task's head class, whether its samples draw a false image (ITM), and its evaluator."""

    head: type[ManagerTowerHeadModel]
    evaluate: Evaluator
    false_image: bool = False


TASKS: dict[str, Task] = {
    "pretrain": Task(TASK_HEADS["pretrain"], _over_batches(evaluate_pretrain), false_image=True),
    "vqav2": Task(TASK_HEADS["vqav2"], _over_batches(evaluate_vqa)),
    "snli_ve": Task(TASK_HEADS["snli_ve"], _over_batches(evaluate_accuracy)),
    "nlvr2": Task(TASK_HEADS["nlvr2"], _over_batches(evaluate_accuracy)),
    "retrieval": Task(TASK_HEADS["retrieval"], evaluate_retrieval),
}
