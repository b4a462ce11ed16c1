"""Several checkpoints through lmms-eval in this Python process, paying its import and task indexing once.

For orchestrators that evaluate many small checkpoints (the tiny ablation): each `python -m lmms_eval` call spends
~20 s of CPU importing lmms-eval and indexing its ~2000 task files before evaluating anything. In-process,
lmms-eval raises on failure instead of exiting 0, and the same checks as `python -m eval run` apply.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .results import STABLE_NAME, Results, add_provenance
from .run import check_results

TINY_TASKS = ("manager_tiny", "manager_tiny_mc")


def evaluate_checkpoints(
    checkpoints: Mapping[str, str | Path],
    output_root: str | Path,
    tasks: Sequence[str] = TINY_TASKS,
    model_args: str = "",
    batch_size: int = 8,
    device: str | None = None,
    limit: int | None = None,
    task_manager=None,
) -> dict[str, Path]:
    """Evaluate each `{name: checkpoint}` with `llava_ov_manager` on `tasks`; write `output_root/name/results.json`.

    `model_args` are added to each checkpoint's (e.g. "dtype=float32,grid=false"); `task_manager` reuses an index
    from `groups.task_manager()`. Returns the results files; raises RuntimeError naming the checkpoint and task when
    a task fails or yields no score (a failed checkpoint gets no results.json).
    """
    from lmms_eval.evaluator import simple_evaluate

    from . import groups

    manager = task_manager or groups.task_manager()
    written = {}
    for name, checkpoint in checkpoints.items():
        arguments = ",".join(part for part in (f"pretrained={checkpoint}", model_args) if part)
        manager.task_group_map.clear()  # it counts tasks loaded per group to rename duplicates: start afresh
        data = simple_evaluate(
            model="llava_ov_manager",
            model_args=arguments,
            tasks=list(tasks),
            batch_size=batch_size,
            device=device,
            limit=limit,
            log_samples=True,  # the generated answers are kept with the scores
            task_manager=manager,
        )
        directory = Path(output_root) / name
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / STABLE_NAME
        staging = directory / f".partial-{STABLE_NAME}"
        staging.write_text(json.dumps(add_provenance(data), indent=2, default=str))
        results = Results()
        results.add(json.loads(staging.read_text()), path)
        problems = check_results(results, list(tasks), predict_only=False, output_dir=directory)
        if problems:
            raise RuntimeError(f"evaluating {name} ({checkpoint}) failed: " + "; ".join(problems))
        os.replace(staging, path)  # only a checked results file ever has the final name
        written[name] = path
    return written
