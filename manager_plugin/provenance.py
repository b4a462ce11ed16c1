"""How an artifact was made: this project's version and commit, Python, and the versions of the libraries that shape
its numbers. Every training stage, evaluation, report and benchmark records it, so a number can be traced to the
code and environment that produced it.

Nothing here depends on the time of day: two runs of the same code in the same environment record the same thing,
so reports stay byte-for-byte comparable.
"""

from __future__ import annotations

import copy
import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT = "llava-manager"
# The distributions whose versions change what this project computes (PyPI names).
LIBRARIES = ("torch", "transformers", "deepspeed", "peft", "accelerate", "datasets", "lmms-eval")
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        completed = subprocess.run(
            ["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip()


def source_revision() -> dict[str, Any]:
    """The git commit of the project's source and whether its tree differed from it (None outside a checkout)."""
    toplevel = _git("rev-parse", "--show-toplevel")
    if toplevel is None or Path(toplevel).resolve() != SOURCE_ROOT:
        return {"git_commit": None, "git_dirty": None}  # an installed wheel, or a checkout of another project
    status = _git("status", "--porcelain")
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}


@functools.cache
def _environment() -> dict[str, Any]:
    return {
        "project": {"name": PROJECT, "version": _version(PROJECT), **source_revision()},
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def environment_provenance() -> dict[str, Any]:
    """`{"project": {name, version, git_commit, git_dirty}, "python": ..., "libraries": {name: version}}`.

    Read once per process (the source tree is not expected to change while a run is going on).
    """
    return copy.deepcopy(_environment())


def describe_environment(provenance: dict[str, Any]) -> str:
    """One line for people: `llava-manager 0.1.0 @ 1a2b3c4d (dirty), Python 3.11.7, torch 2.14.1, ...`."""
    project = provenance["project"]
    commit = project.get("git_commit")
    where = "no git checkout" if commit is None else commit[:10] + (" (dirty)" if project.get("git_dirty") else "")
    libraries = ", ".join(f"{name} {version}" for name, version in provenance["libraries"].items() if version)
    return f"{project['name']} {project['version']} @ {where}, Python {provenance['python']}, {libraries}"
