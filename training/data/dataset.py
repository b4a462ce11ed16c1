"""The training dataset: validated records, templated and with their images loaded, one sample at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .records import Record
from .validation import IMAGE_ERRORS, image_path, strict_image_decoding


class ConversationDataset(Dataset):
    """Samples of validated records: template-encoded token ids (one image token per image), masks, RGB images.

    `lengths` are the exact token lengths from the validation pass, negative for text-only records.
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
        record = self.records[index]
        images = []
        for name in record.images:
            path = image_path(self.image_folder, name)
            try:
                with strict_image_decoding(), Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except IMAGE_ERRORS as error:  # passed the validation pass's check but does not decode
                raise RuntimeError(
                    f"{record.where}: image {name!r} at {path} cannot be decoded ({type(error).__name__}: {error}); "
                    "run with --image_check decode to find such files before training"
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
