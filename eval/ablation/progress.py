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
    """Numbered step lines (`[ 3/17  0:42] ...`) on `stream`; a step's own output (its bars) goes between them. Steps
    may overlap (stage runs side by side): each keeps the number it started with."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.numbered = 0  # steps given a number so far
        self.started = time.monotonic()
        self.stream = stream or sys.stdout

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def line(self, number: int, text: str) -> None:
        """One numbered line (number 0: a line about several steps, unnumbered)."""
        width = len(str(self.total))
        tag = f"{number:>{width}}/{self.total}" if number else " " * (2 * width + 1)
        print(f"[{tag} {clock(self.elapsed()):>5}] {text}", file=self.stream, flush=True)

    def mark(self, label: str, status: str) -> None:
        """A step that does not run now (finished before, or a dry run)."""
        self.numbered += 1
        self.line(self.numbered, f"{label}: {status}")

    def begin(self, label: str) -> tuple[int, float]:
        """A step starts: its line; returns its number and start time, for `end`."""
        self.numbered += 1
        self.line(self.numbered, f"{label} ...")
        return self.numbered, time.monotonic()

    def end(self, ticket: tuple[int, float], label: str, failed: bool = False) -> None:
        """A step `begin` started ends: its line, with its duration."""
        number, began = ticket
        status = "FAILED after" if failed else "done in"
        self.line(number, f"{label}: {status} {clock(time.monotonic() - began)}")

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        """A step that runs: a line when it starts, and one with its duration when it ends (or fails)."""
        ticket = self.begin(label)
        try:
            yield
        except BaseException:
            self.end(ticket, label, failed=True)
            raise
        self.end(ticket, label)
