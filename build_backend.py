"""The build backend: setuptools' own, leaving nothing behind in the source tree.

setuptools builds in `build/` and writes `<name>.egg-info/` next to the sources; a clone should stay as it was after
`pip wheel .` or `python -m build`, so what a build creates there is removed when it ends. (PEP 517 in-tree backend:
`[build-system] backend-path` in pyproject.toml.)
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from setuptools import build_meta
from setuptools.build_meta import *  # every other hook, e.g. get_requires_for_build_wheel, build_editable

SCRATCH = ("build", "*.egg-info")


@contextmanager
def _source_tree_untouched() -> Iterator[None]:
    """Remove the build folders a build creates in the working directory (the source tree) when it ends."""
    root = Path.cwd()
    before = {path for pattern in SCRATCH for path in root.glob(pattern)}
    try:
        yield
    finally:
        for path in {path for pattern in SCRATCH for path in root.glob(pattern)} - before:
            shutil.rmtree(path, ignore_errors=True)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    """PEP 517: setuptools' wheel."""
    with _source_tree_untouched():
        return build_meta.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    """PEP 517: setuptools' sdist."""
    with _source_tree_untouched():
        return build_meta.build_sdist(sdist_directory, config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    """PEP 517: setuptools' wheel metadata."""
    with _source_tree_untouched():
        return build_meta.prepare_metadata_for_build_wheel(metadata_directory, config_settings)
