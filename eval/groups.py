"""Which tasks a group names, read from lmms-eval's task index and the group files alone (no datasets, no network)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import TASKS_DIR

PACKAGE_GROUPS = ("manager_local13", "manager_api7", "manager_20")


@dataclass(frozen=True)
class TaskEntry:
    """One name as the installed lmms-eval knows it: a task, a group (with its leaf tasks), or unknown."""

    name: str
    kind: str  # "task", "python_task", "group", "tag" or "missing"
    leaves: tuple[str, ...] = ()


def task_manager(include_path: str | Path = TASKS_DIR):
    """lmms-eval's task index with this package's tasks (only YAML headers are read)."""
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=str(include_path))


def _listed(manager, name: str) -> list[str]:
    from lmms_eval import utils

    info = manager.task_index[name]
    if info["type"] == "tag":
        return list(info["task"])
    config = utils.load_yaml_config(info["yaml_path"], mode="simple")
    return [entry if isinstance(entry, str) else entry["task"] for entry in config["task"]]


def _is_package_group(manager, name: str) -> bool:
    info = manager.task_index.get(name)
    return info is not None and info["type"] == "group" and Path(info["yaml_path"]).is_relative_to(TASKS_DIR)


def protocol_tasks(manager, group: str) -> list[str]:
    """The task names a package group stands for, its nested package groups expanded (lmms-eval groups kept)."""
    if not _is_package_group(manager, group):
        raise ValueError(f"{group!r} is not one of this package's groups ({', '.join(PACKAGE_GROUPS)})")
    names = []
    for name in _listed(manager, group):
        names.extend(protocol_tasks(manager, name) if _is_package_group(manager, name) else [name])
    return names


def describe(manager, name: str) -> TaskEntry:
    """What the installed lmms-eval has under `name`; a group's or tag's leaf tasks are listed."""
    info = manager.task_index.get(name)
    if info is None:
        return TaskEntry(name, "missing")
    if info["type"] not in ("group", "tag"):
        return TaskEntry(name, info["type"])
    leaves = []
    for member in _listed(manager, name):
        leaves.extend(describe(manager, member).leaves or (member,))
    return TaskEntry(name, info["type"], tuple(leaves))
