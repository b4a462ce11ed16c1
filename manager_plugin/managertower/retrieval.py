"""Image-text retrieval evaluation: ITC ranks everything, ITM re-ranks the top-k candidates, R@K and RSUM."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .heads import ManagerTowerForImageTextRetrieval, select
from .modeling_managertower import UnimodalEncoding


def recall_at_k(
    scores: torch.Tensor, image_ids: torch.Tensor, text_image_ids: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Text retrieval (`tr_r{k}`: an image's top-k texts hold one of its captions) and image retrieval (`ir_r{k}`:
    a text's top-k images hold its image), in percent, with their means and `rsum`.

    `scores` is (num_images, num_texts); `image_ids` (num_images,) and `text_image_ids` (num_texts,) name the image
    of each row and of each text's caption.
    """
    if scores.shape != (len(image_ids), len(text_image_ids)):
        raise ValueError(
            f"scores of shape {tuple(scores.shape)} do not match {len(image_ids)} images x {len(text_image_ids)} texts"
        )
    matches = image_ids[:, None].to(scores.device) == text_image_ids[None, :].to(scores.device)
    metrics: dict[str, float] = {}
    for k in ks:
        top_texts = scores.topk(min(k, scores.shape[1]), dim=1).indices
        top_images = scores.topk(min(k, scores.shape[0]), dim=0).indices
        metrics[f"tr_r{k}"] = 100 * matches.gather(1, top_texts).any(dim=1).float().mean().item()
        metrics[f"ir_r{k}"] = 100 * matches.gather(0, top_images).any(dim=0).float().mean().item()
    metrics["tr_mean"] = sum(metrics[f"tr_r{k}"] for k in ks) / len(ks)
    metrics["ir_mean"] = sum(metrics[f"ir_r{k}"] for k in ks) / len(ks)
    metrics["r_mean"] = (metrics["tr_mean"] + metrics["ir_mean"]) / 2
    metrics["rsum"] = sum(metrics[f"{kind}_r{k}"] for kind in ("tr", "ir") for k in ks)
    return metrics


def top_k_candidates(itc_scores: torch.Tensor, k: int) -> torch.Tensor:
    """(num_images, num_texts) bool: the pair is among an image's top-k texts or a text's top-k images by ITC."""
    candidates = torch.zeros_like(itc_scores, dtype=torch.bool)
    candidates.scatter_(1, itc_scores.topk(min(k, itc_scores.shape[1]), dim=1).indices, True)
    candidates.scatter_(0, itc_scores.topk(min(k, itc_scores.shape[0]), dim=0).indices, True)
    return candidates


def _concat(encodings: list[UnimodalEncoding]) -> UnimodalEncoding:
    return UnimodalEncoding(
        experts=torch.cat([encoding.experts for encoding in encodings]),
        last_hidden_state=torch.cat([encoding.last_hidden_state for encoding in encodings]),
        attention_mask=torch.cat([encoding.attention_mask for encoding in encodings]),
    )


@torch.no_grad()
def encode_corpus(
    model: ManagerTowerForImageTextRetrieval,
    text_batches: Iterable[dict[str, torch.Tensor]],
    image_batches: Iterable[torch.Tensor],
) -> tuple[UnimodalEncoding, UnimodalEncoding]:
    """Every text and image encoded once (texts must share one padded length, e.g. `max_length` padding)."""
    device = next(model.parameters()).device
    texts = [
        model.managertower.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        for batch in tqdm(text_batches, desc="encode texts")
    ]
    images = [
        model.managertower.encode_image(pixels.to(device)) for pixels in tqdm(image_batches, desc="encode images")
    ]
    return _concat(texts), _concat(images)


@torch.no_grad()
def rerank_scores(
    model: ManagerTowerForImageTextRetrieval,
    texts: UnimodalEncoding,
    images: UnimodalEncoding,
    k: int = 128,
    batch_size: int = 64,
) -> torch.Tensor:
    """(num_images, num_texts) scores: the ITM matching logit on the ITC top-k candidate pairs, -inf elsewhere.

    The reference scores an image's top-k texts and a text's top-k images and keeps the larger score per pair; the
    ITM score of a pair does not depend on which direction proposed it, so each candidate pair is scored once.
    """
    itc = model.image_embeddings(images) @ model.text_embeddings(texts).t()
    pairs = top_k_candidates(itc, k).nonzero()
    scores = torch.full_like(itc, float("-inf"))
    for chunk in tqdm(pairs.split(batch_size), desc="ITM re-rank"):
        image_index, text_index = chunk[:, 0], chunk[:, 1]
        logits = model.itm_logits(select(texts, text_index), select(images, image_index))
        scores[image_index, text_index] = logits[:, 1].to(scores.dtype)
    return scores
