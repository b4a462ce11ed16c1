"""Image-text retrieval: ITC ranks everything, ITM re-ranks the top-k candidates; `rank` for users, R@K and RSUM for
evaluation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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
    image_batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]],
    progress: bool = True,
) -> tuple[UnimodalEncoding, UnimodalEncoding]:
    """Every text and image encoded once (texts must share one padded length, e.g. `max_length` padding); an image
    batch is `pixel_values` or `(pixel_values, pixel_mask)`."""
    device = next(model.parameters()).device
    texts = [
        model.managertower.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        for batch in tqdm(text_batches, desc="encode texts", disable=not progress)
    ]
    images = []
    for batch in tqdm(image_batches, desc="encode images", disable=not progress):
        pixels, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        images.append(model.managertower.encode_image(pixels.to(device), None if mask is None else mask.to(device)))
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
    return _rerank(model, texts, images, k, batch_size)[1]


def _rerank(
    model: ManagerTowerForImageTextRetrieval,
    texts: UnimodalEncoding,
    images: UnimodalEncoding,
    k: int,
    batch_size: int,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (num_images, num_texts) ITC similarities, and the ITM scores of the ITC top-k pairs (-inf elsewhere)."""
    itc = model.image_embeddings(images) @ model.text_embeddings(texts).t()
    pairs = top_k_candidates(itc, k).nonzero()
    scores = torch.full_like(itc, float("-inf"))
    for chunk in tqdm(pairs.split(batch_size), desc="ITM re-rank", disable=not progress):
        image_index, text_index = chunk[:, 0], chunk[:, 1]
        logits = model.itm_logits(select(texts, text_index), select(images, image_index))
        scores[image_index, text_index] = logits[:, 1].to(scores.dtype)
    return itc, scores


@dataclass
class RetrievalRanking:
    r"""
    texts_for_images (`torch.Tensor` of shape `(num_images, num_texts)`):
        For each image, the indices of the texts, best first: the ITC top-k candidates ordered by their ITM score,
        then the others by ITC similarity.
    images_for_texts (`torch.Tensor` of shape `(num_texts, num_images)`):
        For each text, the indices of the images, in the same way.
    itm_scores (`torch.Tensor` of shape `(num_images, num_texts)`):
        The ITM matching logit of each candidate pair (-inf for pairs outside every top-k).
    itc_scores (`torch.Tensor` of shape `(num_images, num_texts)`):
        The ITC cosine similarity of every pair.
    """

    texts_for_images: torch.Tensor
    images_for_texts: torch.Tensor
    itm_scores: torch.Tensor
    itc_scores: torch.Tensor


def _order(itm: torch.Tensor, itc: torch.Tensor) -> torch.Tensor:
    """Column indices of each row: by ITM score where scored, the rest after them by ITC similarity."""
    by_itc = itc.argsort(dim=1, descending=True, stable=True)
    by_itm = itm.gather(1, by_itc).argsort(dim=1, descending=True, stable=True)  # ties (-inf) keep the ITC order
    return by_itc.gather(1, by_itm)


@torch.no_grad()
def rank(
    model: ManagerTowerForImageTextRetrieval,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor | None = None,
    *,
    k: int = 16,
    batch_size: int = 64,
) -> RetrievalRanking:
    """Rank the texts for each image and the images for each text: every text and image is encoded once (in
    batches of `batch_size`), ITC proposes each image's and each text's top-`k` candidates, ITM re-ranks them (in
    batches of `batch_size` pairs). The numbers of texts and images may differ: pass `processor(images=...,
    text=..., padding=True, return_tensors="pt")`."""
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be positive, got k={k} and batch_size={batch_size}")
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    text_batches = [
        {"input_ids": ids, "attention_mask": mask}
        for ids, mask in zip(input_ids.split(batch_size), attention_mask.split(batch_size))
    ]
    masks = [None] * len(pixel_values.split(batch_size)) if pixel_mask is None else pixel_mask.split(batch_size)
    image_batches = list(zip(pixel_values.split(batch_size), masks))
    texts, images = encode_corpus(model, text_batches, image_batches, progress=False)
    itc, itm = _rerank(model, texts, images, k, batch_size, progress=False)
    return RetrievalRanking(
        texts_for_images=_order(itm, itc),
        images_for_texts=_order(itm.t(), itc.t()),
        itm_scores=itm,
        itc_scores=itc,
    )
