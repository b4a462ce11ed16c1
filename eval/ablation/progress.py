"""The ablation's progress: one line as each step starts and ends, numbered over all steps, with the elapsed time."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


def clock(seconds: float) -> str:
    """`seconds` as m:ss (h:mm:ss past an hour)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Numbered step lines (`[ 3/17  0:42] ...`) on `stream`; a step's own output (its bars) goes between them."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.stream = stream or sys.stdout

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _line(self, number: int, text: str) -> None:
        width = len(str(self.total))
        print(f"[{number:>{width}}/{self.total} {clock(self.elapsed()):>5}] {text}", file=self.stream, flush=True)

    def mark(self, label: str, status: str) -> None:
        """A step that does not run now (finished before, or a dry run)."""
        self.done += 1
        self._line(self.done, f"{label}: {status}")

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        """A step that runs: a line when it starts, and one with its duration when it ends (or fails)."""
        number = self.done + 1
        self._line(number, f"{label} ...")
        began = time.monotonic()
        try:
            yield
        except BaseException:
            self._line(number, f"{label}: FAILED after {clock(time.monotonic() - began)}")
            raise
        self.done += 1
        self._line(number, f"{label}: done in {clock(time.monotonic() - began)}")
