"""Sampling order grouped by modality and length: each global batch holds samples of one modality (image or
text-only) and similar lengths, so little compute goes to padding.

The order depends only on the seed, the epoch and the global batch size, not on the number of ranks: the same
global batches are seen on one process with gradient accumulation as on many ranks, and a resumed run can skip the
batches it already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ModalityLengthGroupedSampler(Sampler[int]):
    """Indices in groups of `group_size` (the global batch): one modality per group, longest first inside a group.

    `lengths` are token lengths, negative for text-only samples. The leftovers of both modalities form one last
    mixed group. With `group_by_modality_length=False` the order is a plain seeded permutation.
    """

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int = 0, group_by_modality_length: bool = True):
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.group_size = group_size
        self.seed = seed
        self.group = group_by_modality_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if not self.group:
            return iter(torch.randperm(len(self.lengths), generator=generator).tolist())
        full, leftovers = [], []
        for modality in (self.lengths > 0, self.lengths < 0):
            indices = modality.nonzero().flatten()
            indices = indices[torch.randperm(len(indices), generator=generator)]
            cut = len(indices) - len(indices) % self.group_size
            full += list(indices[:cut].split(self.group_size))
            leftovers.append(indices[cut:])
        groups = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        tail = torch.cat(leftovers)
        if len(tail):
            groups.append(tail)
        order = [group[torch.argsort(self.lengths[group].abs(), descending=True, stable=True)] for group in groups]
        return iter(torch.cat(order).tolist() if order else [])
