"""Batches for the model: `prepare_inputs` tokenises and makes pixel values; the template's masks are carried through
the image-token expansion to give `labels` (and the manager's query mask); long samples lose text after their last
image only; a batch without any image gets a dummy one so that every rank runs the same modules (ZeRO-3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from llava_integration import QUERY_MASK_KWARG, prepare_inputs

from .dataset import BAD_RECORDS
from .image_tokens import image_token_counts

IGNORE_INDEX = -100


def dummy_image(processor) -> Image.Image:
    """A grey image of the vision tower's input size (the crop size, for processors that resize then crop)."""
    image_processor = processor.image_processor
    size = getattr(image_processor, "crop_size", None) or image_processor.size
    side = size.get("shortest_edge")
    return Image.new("RGB", (size.get("width") or side, size.get("height") or side), (128, 128, 128))


@dataclass
class TrainingCollator:
    """Collate `ConversationDataset` samples into model inputs with `labels`.

    Dummy image: when no sample of a batch has an image, one image token is appended to the shortest sample, after
    its last real token, with a grey image and no label. Causal attention keeps every real token from seeing it and
    it carries no loss, so the loss and every gradient are exactly those of the batch without it; but the vision
    tower, projector and manager run on every rank, which ZeRO-3 needs (its parameter gathers are collective).
    """

    processor: Any
    image_aspect_ratio: str | None  # None: the processor's own image mode (LLaVA-1.5, NeXT)
    model_max_length: int
    with_query_mask: bool = False
    ensure_image: bool = True

    def __post_init__(self) -> None:
        self.processor.tokenizer.padding_side = "right"  # labels and the truncation rule assume real tokens first
        self.image_token_id = self.processor.image_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [feature["text"] for feature in features]
        images = [list(feature["images"]) for feature in features]
        ids = [feature["input_ids"] for feature in features]
        targets = [feature["target_mask"] for feature in features]
        queries = [feature["query_mask"] for feature in features]
        dummy_row = None
        if self.ensure_image and not any(images):
            dummy_row = min(range(len(features)), key=lambda row: len(ids[row]))
            texts[dummy_row] = texts[dummy_row] + self.processor.image_token
            ids[dummy_row] = torch.cat([ids[dummy_row], torch.tensor([self.image_token_id])])
            targets[dummy_row] = torch.cat([targets[dummy_row], torch.tensor([False])])
            queries[dummy_row] = torch.cat([queries[dummy_row], torch.tensor([False])])
            images[dummy_row] = [dummy_image(self.processor)]

        batch = prepare_inputs(self.processor, texts, images, self.image_aspect_ratio, padding=True)
        counts = [self._token_counts(ids[row], images[row], features[row]["where"]) for row in range(len(features))]
        lengths = [int(c.sum()) for c in counts]
        flat_counts = torch.cat(counts)
        expected = self._pad(
            torch.cat(ids).repeat_interleave(flat_counts), lengths, self.processor.tokenizer.pad_token_id
        )
        input_ids = batch["input_ids"]
        if expected.shape != input_ids.shape or not torch.equal(expected, input_ids):
            rows = [features[r]["where"] for r in range(len(features)) if not self._row_matches(expected, input_ids, r)]
            raise RuntimeError(f"the processor expanded the image tokens of {rows} differently than predicted")
        target = self._pad(torch.cat(targets).repeat_interleave(flat_counts), lengths, False)
        labels = torch.where(target, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

        out = {key: value for key, value in batch.items() if value is not None}
        out["labels"] = labels
        if self.with_query_mask:
            out[QUERY_MASK_KWARG] = self._pad(torch.cat(queries).repeat_interleave(flat_counts), lengths, False)
        limit = self.model_max_length if dummy_row is None else max(self.model_max_length, lengths[dummy_row])
        if input_ids.shape[1] > limit:
            out = self._truncate(out, limit, features, dummy_row)
        bad = [entry for feature in features for entry in feature.get(BAD_RECORDS, ())]
        if bad:
            out[BAD_RECORDS] = bad
        return out

    def _token_counts(self, ids: torch.Tensor, images: list[Image.Image], where: str) -> torch.Tensor:
        positions = (ids == self.image_token_id).nonzero().flatten()
        if len(positions) != len(images):
            raise RuntimeError(f"{where}: {len(positions)} image tokens in the text but {len(images)} images")
        counts = torch.ones_like(ids)
        sizes = [(image.height, image.width) for image in images]
        counts[positions] = torch.tensor(
            image_token_counts(self.processor, sizes, self.image_aspect_ratio), dtype=ids.dtype
        )
        return counts

    @staticmethod
    def _pad(flat: torch.Tensor, lengths: list[int], value) -> torch.Tensor:
        return pad_sequence(list(torch.split(flat, lengths)), batch_first=True, padding_value=value)

    @staticmethod
    def _row_matches(expected: torch.Tensor, actual: torch.Tensor, row: int) -> bool:
        width = min(expected.shape[1], actual.shape[1])
        return expected.shape[1] == actual.shape[1] and torch.equal(expected[row, :width], actual[row, :width])

    def _truncate(self, out: dict, limit: int, features: list[dict], dummy_row: int | None) -> dict:
        """Cut every row to `limit` tokens, which only ever drops text after a row's last image."""
        is_image = out["input_ids"] == self.image_token_id
        positions = torch.arange(is_image.shape[1]).expand_as(is_image)
        last_image_end = torch.where(is_image, positions + 1, torch.zeros_like(positions)).amax(dim=1)
        too_long = [r for r in range(len(features)) if r != dummy_row and int(last_image_end[r]) > limit]
        if too_long:
            raise RuntimeError(
                f"{[features[r]['where'] for r in too_long]}: image tokens reach beyond model_max_length "
                f"{self.model_max_length}; the validation pass should have rejected these records"
            )
        return {
            key: value[:, :limit] if key in ("input_ids", "attention_mask", "labels", QUERY_MASK_KWARG) else value
            for key, value in out.items()
        }
