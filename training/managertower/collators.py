"""Batch collation: tokenise the texts (padded to `max_text_len`, as the reference), stack images, build labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


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


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking, drawn from `generator`: each `maskable` token is chosen with `probability`; a chosen token
    becomes `mask_token_id` (80%), a random token (10%) or stays (10%). Returns the masked ids and the labels (the
    original id where chosen, -100 elsewhere)."""
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & maskable
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    masked = torch.where(chosen & (action < 0.8), mask_token_id, input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, torch.where(chosen, input_ids, -100)


@dataclass
class TaskCollator:
    """Collate `TaskDataset` samples into model inputs; for pre-training, also the masked text and its labels (each
    sample's mask drawn from its `draw_seed` where it has one, so it does not depend on the batch it is in)."""

    tokenizer: PreTrainedTokenizerBase
    task: str
    max_text_len: int
    num_labels: int = 0
    mlm_probability: float = 0.15

    def __post_init__(self) -> None:
        if self.task not in TASK_LABELS:
            raise ValueError(f"unknown task {self.task!r}: expected one of {sorted(TASK_LABELS)}")
        if self.task == "pretrain" and self.tokenizer.mask_token_id is None:
            raise ValueError("pre-training masks text: the tokenizer has no mask token")

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoding = self.tokenizer(
            [sample["text"] for sample in samples],
            padding="max_length",
            truncation=True,
            max_length=self.max_text_len,
            return_special_tokens_mask=self.task == "pretrain",
            return_tensors="pt",
        )
        batch = {
            "input_ids": encoding["input_ids"],
            "attention_mask": encoding["attention_mask"],
            "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
        }
        if "false_pixel_values" in samples[0]:
            batch["false_pixel_values"] = torch.stack([sample["false_pixel_values"] for sample in samples])
        if self.task == "pretrain":
            maskable = (encoding["special_tokens_mask"] == 0) & (encoding["attention_mask"] == 1)
            rows = [
                mask_tokens(
                    ids,
                    can_mask,
                    self.tokenizer.mask_token_id,
                    len(self.tokenizer),
                    self.mlm_probability,
                    torch.Generator().manual_seed(sample["draw_seed"]) if "draw_seed" in sample else None,
                )
                for ids, can_mask, sample in zip(encoding["input_ids"], maskable, samples, strict=True)
            ]
            batch["mlm_input_ids"] = torch.stack([masked for masked, _ in rows])
            batch["mlm_labels"] = torch.stack([labels for _, labels in rows])
        batch.update(TASK_LABELS[self.task](samples, self.num_labels))
        return batch
