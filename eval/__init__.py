"""Evaluation of manager checkpoints with lmms-eval: the `llava_ov_manager` model, task groups, ablation report.

The model registers through this package's `lmms_eval.models` entry point (see `registry.py`); the task groups and
the tiny task live in `TASKS_DIR`, which lmms-eval reads with `--include_path` (`python -m eval run` adds it).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = ["TASKS_DIR"]
