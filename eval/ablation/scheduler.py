"""The ablation's steps, in order, with stage runs side by side: on a CPU of N cores, N one-thread trainings at once.

The tiny model trains no faster with more threads, but two trainings on two cores take the time of one. With more
than one job each stage run goes to a fresh worker process, forked from a server that has imported the training stack
once (so a worker starts in a fraction of a second and inherits nothing from an earlier run), with its output in
`OUT/seed_S/logs/RECIPE.log`. A stage run starts once the run it starts from has finished; evaluations and the other
steps run in this process, each as soon as what it reads exists. The results are those of the steps run one after
another: every stage run is seeded by its own arguments alone.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.connection import wait
from pathlib import Path

from .launchers import StepFailed
from .progress import Progress
from .steps import EvalStep, StageStep, Step, remove

# What a worker imports before it forks: the training stack (torch, transformers, the recipes).
PRELOAD = ["training.cli", "training.run", "training.arguments"]
HEARTBEAT_SECONDS = 60.0  # how often a line says where the runs in flight are
LOG_TAIL_LINES = 15  # of a failed run's log, in the error


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def log_path(step: StageStep) -> Path:
    """Where a stage run's output goes: `logs/RECIPE.log` beside the run's `stages/`."""
    return step.directory.parent.parent / "logs" / f"{step.run_spec.recipe}.log"


def train_in_worker(argv: list[str], log: str, threads: int) -> None:
    """A worker's whole life: its output to `log`, `threads` torch threads, `python -m training argv`."""
    handle = open(log, "w", buffering=1)  # noqa: SIM115 (the process's output until it exits)
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    sys.stdout = sys.stderr = handle
    import torch

    torch.set_num_threads(threads)
    from training.cli import main

    main(argv)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of `path` (progress bars' carriage returns as line breaks)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "\n").rstrip().splitlines()[-lines:])


def training_step(path: Path) -> str | None:
    """`step/total` of the newest progress bar in a run's log, if it shows one yet."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 4096))
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    found = re.findall(r"(\d+)/(\d+) \[", text)
    return f"step {found[-1][0]}/{found[-1][1]}" if found else None


@dataclass
class InFlight:
    step: StageStep
    process: multiprocessing.process.BaseProcess
    ticket: tuple[int, float]
    log: Path


class StepScheduler:
    """Runs `steps` (in their listed order, which has every step after what it reads), skipping finished ones unless
    `force`: with `jobs` > 1, up to `jobs` stage runs at once in worker processes of `threads` threads each; with 1,
    every step in this process, one after another."""

    def __init__(self, jobs: int, threads: int, progress: Progress, force: bool = False):
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs, self.threads, self.progress, self.force = jobs, threads, progress, force
        if jobs > 1:
            self.context = multiprocessing.get_context("forkserver")
            self.context.set_forkserver_preload(PRELOAD)
            forkserver.ensure_running()  # its imports now, while this process runs the first steps

    def run(self, steps: Sequence[Step]) -> None:
        waiting = list(steps)
        flying: list[InFlight] = []
        heartbeat = time.monotonic()
        try:
            while waiting or flying:
                waiting = self._start_what_can(waiting, flying)
                if not flying:
                    if waiting:  # cannot happen for a plan in order; never wait forever
                        raise StepFailed(f"{waiting[0].label}: waits on a step that is not in the run")
                    break
                ready = wait([item.process.sentinel for item in flying], timeout=5.0)
                for item in [item for item in flying if item.process.sentinel in ready]:
                    flying.remove(item)
                    self._finish(item)
                if time.monotonic() - heartbeat >= HEARTBEAT_SECONDS:
                    heartbeat = time.monotonic()
                    where = (f"{item.step.run_spec.recipe} {training_step(item.log) or 'starting'}" for item in flying)
                    self.progress.line(0, "running: " + ", ".join(where))
        except BaseException:
            for item in flying:  # a failed step, or Ctrl-C: stop the runs in flight too
                item.process.terminate()
                item.process.join()
                self.progress.end(item.ticket, item.step.label, failed=True)
            raise

    def _start_what_can(self, waiting: list[Step], flying: list[InFlight]) -> list[Step]:
        """Start every waiting step whose inputs exist (stage runs while a worker is free); return those left."""
        left: list[Step] = []
        for step in waiting:
            made_later = {other.directory for other in [*left, *(item.step for item in flying)]
                          if isinstance(other, StageStep)}  # fmt: skip
            if isinstance(step, StageStep) and (step.parent_directory in made_later or len(flying) >= self.jobs):
                left.append(step)
                continue
            if isinstance(step, EvalStep) and step.job.checkpoint in made_later:
                left.append(step)
                continue
            reason = None if self.force else step.finished()
            if reason:
                self.progress.mark(step.label, f"skipped, {reason}")
            elif isinstance(step, StageStep) and self.jobs > 1:
                flying.append(self._launch(step))
            else:
                if self.force and isinstance(step, StageStep):
                    remove(step.directory)
                with self.progress.step(step.label):
                    step.run()
        return left

    def _launch(self, step: StageStep) -> InFlight:
        if self.force:
            remove(step.directory)
        argv = step.prepare()
        log = log_path(step)
        log.parent.mkdir(parents=True, exist_ok=True)
        ticket = self.progress.begin(f"{step.label} [log: {log}]")
        process = self.context.Process(target=train_in_worker, args=(argv, str(log), self.threads), daemon=True)
        process.start()
        return InFlight(step, process, ticket, log)

    def _finish(self, item: InFlight) -> None:
        item.process.join()
        if item.process.exitcode != 0:
            self.progress.end(item.ticket, item.step.label, failed=True)
            raise StepFailed(
                f"stage {item.step.run_spec.recipe} exited with code {item.process.exitcode}; the end of its log "
                f"{item.log}:\n{tail(item.log)}"
            )
        item.step.complete()
        self.progress.end(item.ticket, item.step.label)
