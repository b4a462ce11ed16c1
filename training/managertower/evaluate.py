"""Task metrics: MLM/ITM accuracy, VQA score, SNLI-VE and NLVR2 accuracy, retrieval R@1/5/10 and RSUM."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from manager_plugin.managertower.retrieval import encode_corpus, recall_at_k, rerank_scores

from .collators import TaskCollator
from .datasets import TaskDataset, UniqueImages


def _batches(model: torch.nn.Module, loader: DataLoader, desc: str) -> Iterator[tuple[dict[str, Any], Any]]:
    device = next(model.parameters()).device
    for batch in tqdm(loader, desc=desc):
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        yield batch, model(**batch)


@torch.no_grad()
def evaluate_pretrain(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """Accuracy of the masked-token predictions and of image-text matching."""
    mlm_hits = mlm_total = itm_hits = itm_total = 0
    for batch, output in _batches(model, loader, "evaluate pretrain"):
        masked = batch["mlm_labels"] != -100
        mlm_hits += (output.mlm_logits.argmax(-1)[masked] == batch["mlm_labels"][masked]).sum().item()
        mlm_total += masked.sum().item()
        itm_hits += (output.itm_logits.argmax(-1) == output.itm_labels).sum().item()
        itm_total += len(output.itm_labels)
    return {"mlm_accuracy": 100 * mlm_hits / max(mlm_total, 1), "itm_accuracy": 100 * itm_hits / max(itm_total, 1)}


@torch.no_grad()
def evaluate_vqa(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """VQA score: the soft score of the top answer, averaged over questions."""
    score = count = 0.0
    for batch, output in _batches(model, loader, "evaluate vqav2"):
        best = output.logits.argmax(-1, keepdim=True)
        score += batch["labels"].gather(1, best).sum().item()
        count += len(best)
    return {"vqa_score": 100 * score / max(count, 1)}


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """Classification accuracy (SNLI-VE, NLVR2)."""
    hits = count = 0
    for batch, output in _batches(model, loader, "evaluate accuracy"):
        hits += (output.logits.argmax(-1) == batch["labels"]).sum().item()
        count += len(batch["labels"])
    return {"accuracy": 100 * hits / max(count, 1)}


@torch.no_grad()
def evaluate_retrieval(
    model: torch.nn.Module, dataset: TaskDataset, collator: TaskCollator, batch_size: int, k_test: int
) -> dict[str, float]:
    """Every caption against every image: ITC top-`k_test` candidates re-ranked by ITM, then R@1/5/10 and RSUM."""
    records = dataset.records
    texts = records.texts()
    text_batches = (
        collator.tokenizer(
            texts[start : start + batch_size],
            padding="max_length",
            truncation=True,
            max_length=collator.max_text_len,
            return_tensors="pt",
        )
        for start in range(0, len(texts), batch_size)
    )
    images = UniqueImages(records, dataset.transform)
    image_loader = DataLoader(
        images, batch_size=batch_size, collate_fn=lambda samples: torch.stack([s["pixel_values"] for s in samples])
    )
    text_encoding, image_encoding = encode_corpus(model, text_batches, image_loader)
    scores = rerank_scores(model, text_encoding, image_encoding, k=k_test, batch_size=batch_size)
    return recall_at_k(scores, torch.as_tensor(images.ids), torch.as_tensor(records.image_ids()))
