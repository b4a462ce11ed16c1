"""Model-agnostic file writing shared by the adapters, the checkpoint converters and their callers.

Nothing is ever left half-written: a file is written under a temporary name and renamed over its target; a directory
is assembled under a staging name beside its destination and renamed into place when complete. Both end with the
permissions the user's umask gives a new file or directory (`tempfile` creates them private to the owner).
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


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode `open()` or `mkdir()` would give a new file or directory under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(temporary_path)` and rename the result to `path`; on failure nothing appears at `path`."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, umask_mode())
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
        staging.chmod(umask_mode(directory=True))
        yield staging
        if destination.exists():
            destination.rmdir()  # checked empty above
        staging.rename(destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
