"""Task datasets: records with their images read and transformed; texts stay strings for the batch collator."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .readers import open_image


class TaskDataset(Dataset):
    """Each sample is its record with `pixel_values` in place of the image reference(s), and its `draw_seed`.

    NLVR2 records carry two images (`pixel_values` (2, C, H, W)). With `false_image`, each sample also gets the image
    of a random other sample as `false_pixel_values`, for image-text matching (the reference's `draw_false_image`).
    A sample's random draws (its false image here, its MLM mask in the collator) come from `draw_seed`, a function of
    `seed`, the epoch and the sample's index: the same whichever rank, worker or batch reads it, new each epoch.
    """

    def __init__(self, records: Any, transform: Callable, false_image: bool = False, seed: int = 0) -> None:
        self.records = records
        self.transform = transform
        self.false_image = false_image
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's false images and masks (the Trainer calls it as each epoch begins)."""
        self.epoch = epoch

    def draw_seed(self, index: int) -> int:
        """The seed of sample `index`'s random draws in the current epoch."""
        return int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])

    def __len__(self) -> int:
        return len(self.records)

    def _pixels(self, record: dict[str, Any]) -> torch.Tensor:
        if "images" in record:
            return torch.stack([self.transform(open_image(image)) for image in record["images"]])
        return self.transform(open_image(record["image"]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        sample = {key: value for key, value in record.items() if key not in ("image", "images")}
        sample["pixel_values"] = self._pixels(record)
        sample["draw_seed"] = self.draw_seed(index)
        if self.false_image:
            other = random.Random(sample["draw_seed"]).randrange(len(self.records))
            sample["false_pixel_values"] = self._pixels(self.records[other])
        return sample


class UniqueImages(Dataset):
    """The distinct images of retrieval records (the first record of each image id), with their ids."""

    def __init__(self, records: Any, transform: Callable) -> None:
        self.records = records
        self.transform = transform
        self.ids, self.indices = np.unique(records.image_ids(), return_index=True)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[int(self.indices[index])]
        return {"pixel_values": self.transform(open_image(record["image"])), "image_id": int(self.ids[index])}
