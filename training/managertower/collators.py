"""Batch collation: tokenise the texts (padded to `max_text_len`, as the reference), stack images, build labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase


def vqa_targets(samples: list[dict[str, Any]], num_labels: int) -> torch.Tensor:
    """(B, num_labels) soft scores from each sample's answer `labels` and `scores` lists."""
    counts = torch.tensor([len(sample["labels"]) for sample in samples])
    rows = torch.repeat_interleave(torch.arange(len(samples)), counts)
    columns = torch.tensor([label for sample in samples for label in sample["labels"]], dtype=torch.long)
    scores = torch.tensor([score for sample in samples for score in sample["scores"]], dtype=torch.float)
    if len(columns) and (columns.min() < 0 or columns.max() >= num_labels):
        raise ValueError(f"answer label {int(columns.max())} out of range: the head has {num_labels} answers")
    targets = torch.zeros(len(samples), num_labels)
    targets[rows, columns] = scores
    return targets


def _class_labels(samples: list[dict[str, Any]], num_labels: int) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor([sample["label"] for sample in samples], dtype=torch.long)}


def _vqa_labels(samples: list[dict[str, Any]], num_labels: int) -> dict[str, torch.Tensor]:
    return {"labels": vqa_targets(samples, num_labels)} if "labels" in samples[0] else {}


def _image_ids(samples: list[dict[str, Any]], num_labels: int) -> dict[str, torch.Tensor]:
    return {"image_ids": torch.tensor([sample["image_id"] for sample in samples], dtype=torch.long)}


def _no_labels(samples: list[dict[str, Any]], num_labels: int) -> dict[str, torch.Tensor]:
    return {}


TASK_LABELS: dict[str, Callable[[list[dict[str, Any]], int], dict[str, torch.Tensor]]] = {
    "pretrain": _no_labels,
    "vqav2": _vqa_labels,
    "snli_ve": _class_labels,
    "nlvr2": _class_labels,
    "retrieval": _image_ids,
}


@dataclass
class TaskCollator:
    """Collate `TaskDataset` samples into model inputs; for pre-training, also the masked text and its labels."""

    tokenizer: PreTrainedTokenizerBase
    task: str
    max_text_len: int
    num_labels: int = 0
    mlm_probability: float = 0.15

    def __post_init__(self) -> None:
        if self.task not in TASK_LABELS:
            raise ValueError(f"unknown task {self.task!r}: expected one of {sorted(TASK_LABELS)}")
        self._masker = None
        if self.task == "pretrain":
            self._masker = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.mlm_probability)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoding = self.tokenizer(
            [sample["text"] for sample in samples],
            padding="max_length",
            truncation=True,
            max_length=self.max_text_len,
            return_special_tokens_mask=self._masker is not None,
            return_tensors="pt",
        )
        batch = {
            "input_ids": encoding["input_ids"],
            "attention_mask": encoding["attention_mask"],
            "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
        }
        if "false_pixel_values" in samples[0]:
            batch["false_pixel_values"] = torch.stack([sample["false_pixel_values"] for sample in samples])
        if self._masker is not None:
            masked, labels = self._masker.torch_mask_tokens(
                encoding["input_ids"].clone(), special_tokens_mask=encoding["special_tokens_mask"]
            )
            batch["mlm_input_ids"], batch["mlm_labels"] = masked, labels
        batch.update(TASK_LABELS[self.task](samples, self.num_labels))
        return batch
