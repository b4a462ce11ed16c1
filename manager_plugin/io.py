"""Model-agnostic file writing shared by the adapters, the checkpoint converters and their callers.

Nothing is ever left half-written: a file is written under a temporary name and renamed over its target; a directory
is assembled under a staging name beside its destination and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class ConversionError(ValueError):
    """A checkpoint that cannot be converted, with the reason and the offending name or value."""


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(temporary_path)` and rename the result to `path`; on failure nothing appears at `path`."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_destination(destination: Path) -> None:
    """Refuse a destination that already holds something, before any work is done."""
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise ConversionError(f"destination {destination} already exists and is not an empty directory")


@contextmanager
def staged_directory(destination: Path) -> Iterator[Path]:
    """A temporary directory beside `destination`, renamed to it when the block succeeds and deleted when it fails."""
    check_destination(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        if destination.exists():
            destination.rmdir()  # checked empty above
        staging.rename(destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
