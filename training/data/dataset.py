"""The training dataset: validated records, templated and with their images loaded, one sample at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .records import Record
from .validation import IMAGE_ERRORS, image_path, strict_image_decoding

# A sample that stands in for records that failed to decode lists them under this key; the collator gathers them
# into the batch and the trainer acts on them as --on_bad_data says.
BAD_RECORDS = "bad_records"


class UndecodableRecord(Exception):
    """A record whose image passed the validation pass's check but does not decode."""


class ConversationDataset(Dataset):
    """Samples of validated records: template-encoded token ids (one image token per image), masks, RGB images.

    `lengths` are the exact token lengths from the validation pass, negative for text-only records. A record that
    fails to decode is replaced by the next one that does, and listed in the sample under `BAD_RECORDS`.
    """

    def __init__(self, records: list[Record], lengths: list[int], template, processor, image_folder: str | Path | None):
        if len(records) != len(lengths):
            raise ValueError(f"{len(records)} records but {len(lengths)} lengths")
        self.records = records
        self.lengths = lengths
        self.template = template
        self.processor = processor
        self.image_folder = image_folder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        bad = []
        for position in range(index, index + len(self.records)):
            record = self.records[position % len(self.records)]
            try:
                sample = self._sample(record)
            except UndecodableRecord as error:
                bad.append({"record": record.where, "reason": str(error)})
                continue
            return {**sample, BAD_RECORDS: bad} if bad else sample
        raise RuntimeError(f"none of the {len(self.records)} records decodes; first: {bad[0]['reason']}")

    def _sample(self, record: Record) -> dict[str, Any]:
        images = []
        for name in record.images:
            path = image_path(self.image_folder, name)
            try:
                with strict_image_decoding(), Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except IMAGE_ERRORS as error:  # passed the validation pass's check but does not decode
                detail = " ".join(f"{type(error).__name__}: {error}".split())
                raise UndecodableRecord(
                    f"image {name!r} at {path} cannot be decoded ({detail}); --image_check decode finds such files "
                    "before training"
                ) from error
        encoded = self.template.encode(record, self.processor)
        return {
            "where": record.where,
            "text": encoded.text,
            "input_ids": encoded.input_ids,
            "target_mask": encoded.target_mask,
            "query_mask": encoded.query_mask,
            "images": images,
        }
