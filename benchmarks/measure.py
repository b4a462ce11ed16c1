"""Timing and memory of the four variants: a training step, a prefill, and decoding.

Every measurement runs the variants interleaved (the order rotates each repeat), so a change in the machine's load
during the run hits all variants alike.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, replace
from math import inf

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from tqdm import tqdm
from transformers import BatchFeature, LogitsProcessor, LogitsProcessorList

from llava_integration import set_image_aspect_ratio
from llava_integration.families import ModelFamily
from llava_integration.image_modes import SQUARE


@dataclass(frozen=True)
class Variant:
    """One column of the paper's ablation: square or AnyRes images, with or without the manager."""

    name: str
    label: str
    aspect: str | None  # OneVision's image mode; None: the one mode of the other families' processors
    manager: bool


GRID = "anyres_max_9"
VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("baseline", "Baseline", "square", False),
        Variant("manager", "+Manager", "square", True),
        Variant("grid", "+Grid", GRID, False),
        Variant("grid_manager", "+Grid+Manager", GRID, True),
    )
}
# The manager's overhead is each manager variant over the same variant without it.
MANAGER_PAIRS = {"manager": "baseline", "grid_manager": "grid"}


def family_variants(family: ModelFamily) -> dict[str, Variant]:
    """The variants a model of `family` runs: OneVision all four (it switches between square and AnyRes images);
    LLaVA-1.5, whose images have no grid, Baseline and +Manager; NeXT, always AnyRes, +Grid and +Grid+Manager."""
    if family.square_images:
        return VARIANTS
    grid = family.pack is not None
    return {name: replace(v, aspect=None) for name, v in VARIANTS.items() if (v.aspect != SQUARE) == grid}


@dataclass
class Subject:
    """Everything one variant runs: its model (shared with the other aspect ratio), optimizer and batch."""

    variant: Variant
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: BatchFeature
    labels: torch.Tensor

    def select(self) -> torch.nn.Module:
        """The model, switched to this variant's image aspect ratio (where the family has several)."""
        if self.variant.aspect is None:
            return self.model
        return set_image_aspect_ratio(self.model, self.variant.aspect)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued device work, so that host clocks time the device."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def train_step(subject: Subject) -> None:
    """Forward, backward and optimizer step on every parameter (stage-2-like)."""
    model = subject.select().train()
    loss = model(**subject.batch, labels=subject.labels).loss
    loss.backward()
    subject.optimizer.step()
    subject.optimizer.zero_grad(set_to_none=True)


class _StepClock(LogitsProcessor):
    """Stamps the wall and CPU clocks when each generation step's logits are ready."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.times: list[tuple[float, float]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.sync()
        self.times.append(_clocks())
        return scores


def _clocks() -> tuple[float, float]:
    """Wall time, and this process's CPU time (which other processes' load does not inflate)."""
    return time.perf_counter(), time.process_time()


@torch.no_grad()
def generate_timed(subject: Subject, new_tokens: int, sync: Callable[[], None]) -> dict[str, float]:
    """Greedy `generate` of exactly `new_tokens`: time to the first token's logits, and per decode step."""
    model = subject.select().eval()
    clock = _StepClock(sync)
    sync()
    start = _clocks()
    model.generate(
        **subject.batch,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
    )
    (first_wall, first_cpu), (last_wall, last_cpu) = clock.times[0], clock.times[-1]
    steps = len(clock.times) - 1
    return {
        "prefill_s": first_wall - start[0],
        "prefill_cpu_s": first_cpu - start[1],
        "decode_s_per_step": (last_wall - first_wall) / steps,
        "decode_cpu_s_per_step": (last_cpu - first_cpu) / steps,
    }


@torch.no_grad()
def generate_tokens(subject: Subject, new_tokens: int) -> None:
    """Greedy `generate` of exactly `new_tokens` (prefill + decode steps), untimed: for its peak memory."""
    subject.select().eval().generate(
        **subject.batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )


@torch.no_grad()
def prefill(subject: Subject) -> None:
    """One prefill forward, as `generate` runs it: cache on, logits of the last position only."""
    subject.select().eval()(**subject.batch, use_cache=True, logits_to_keep=1)


def timed_train_step(subject: Subject, sync: Callable[[], None]) -> dict[str, float]:
    """One training step's wall and CPU time."""
    return _timed("train_step", train_step, subject, sync)


def timed_prefill(subject: Subject, sync: Callable[[], None]) -> dict[str, float]:
    """One prefill forward's wall and CPU time (no `generate` around it: the forward alone)."""
    return _timed("prefill", prefill, subject, sync)


def _timed(
    name: str, action: Callable[[Subject], None], subject: Subject, sync: Callable[[], None]
) -> dict[str, float]:
    """`action(subject)`'s wall and CPU time as `<name>_s` and `<name>_cpu_s`, the device synchronised around it."""
    sync()
    start = _clocks()
    action(subject)
    sync()
    end = _clocks()
    return {f"{name}_s": end[0] - start[0], f"{name}_cpu_s": end[1] - start[1]}


def interleaved(
    subjects: list[Subject], repeats: int, measure: Callable[[Subject], dict[str, float]], description: str
) -> dict[str, dict[str, list[float]]]:
    """`measure` on every subject, `repeats` times, the order rotating by one subject each repeat."""
    results: dict[str, dict[str, list[float]]] = {subject.variant.name: {} for subject in subjects}
    for repeat in tqdm(range(repeats), desc=description, leave=False):
        shift = repeat % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:
            for metric, value in measure(subject).items():
                results[subject.variant.name].setdefault(metric, []).append(value)
    return results


def time_training(subjects: list[Subject], repeats: int, sync: Callable[[], None]) -> dict[str, dict[str, list]]:
    return interleaved(subjects, repeats, lambda s: timed_train_step(s, sync), "training steps")


def time_generation(
    subjects: list[Subject], repeats: int, new_tokens: int, sync: Callable[[], None]
) -> dict[str, dict[str, list]]:
    return interleaved(subjects, repeats, lambda s: generate_timed(s, new_tokens, sync), "generation")


def step_peak_memories(steps: dict[str, Callable[[], None]], device: torch.device) -> dict[str, dict[str, int | None]]:
    """Per named step: peak bytes of tensors allocated during it above what was live when it started ("step"), and
    on CUDA the peak of everything allocated, weights and optimizer state included ("total").

    CUDA: the caching allocator's statistics. CPU: PyTorch keeps no allocator statistics there, so one profiler
    session records every tensor allocation and free, each step inside its own `record_function` range, and the peak
    of the running sum inside each range is taken. This counts tensor storage only (not the Python heap, nor memory
    the C allocator keeps cached), which is what differs between variants.
    """
    if device.type == "cuda":
        peaks = {}
        for name, step in steps.items():
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize(device)
            total = torch.cuda.max_memory_allocated(device)
            peaks[name] = {"step": total - start, "total": total}
        return peaks
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        for name, step in steps.items():
            with record_function(f"step_peak_memory/{name}"):
                step()
    allocations, ranges = [], {}
    for event in profiler.profiler.kineto_results.events():
        name = event.name()
        if name == "[memory]":
            allocations.append((event.start_ns(), event.nbytes()))  # positive for an allocation, negative for a free
        elif name.startswith("step_peak_memory/"):
            ranges[name.removeprefix("step_peak_memory/")] = (event.start_ns(), event.end_ns())
    allocations.sort()
    peaks = {}
    for name, (start, end) in ranges.items():
        live = peak = 0
        for _, nbytes in allocations[bisect_left(allocations, (start, -inf)) : bisect_right(allocations, (end, inf))]:
            live += nbytes
            peak = max(peak, live)
        peaks[name] = {"step": peak, "total": None}
    return peaks
