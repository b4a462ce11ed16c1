"""`llava_ov_manager_replay`: answers with the predictions an earlier `--predict_only --log_samples` run logged.

Phase 2 of the judge protocol: phase 1 generates on an offline GPU node; this model replays those answers on a node
with network access, so lmms-eval's own task code calls the judge and aggregates the scores. (lmms-eval 0.7.3's
built-in `from_log` model reads an older log format, not the `*_samples_<task>.jsonl` files 0.7.3 writes.)
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger

SAMPLES_FILE = re.compile(r"(?P<stamp>.+)_samples_(?P<task>.+)\.jsonl$")


def _logged_answers(sample: dict[str, Any]) -> list[str] | None:
    """The raw answers of one logged document (before the task's filters), one per repeat; None if not generated."""
    answers = sample["resps"] if "resps" in sample else sample["filtered_resps"]  # lmms-eval drops `resps` if equal
    if isinstance(answers, str):
        return [answers]
    if isinstance(answers, list) and answers and all(isinstance(answer, str) for answer in answers):
        return answers
    return None


def load_predictions(directory: str | Path) -> tuple[dict[str, dict[int, list[str]]], dict[str, str]]:
    """`{task: {doc_id: answers}}` from the newest `*_samples_<task>.jsonl` of each task under `directory`, and why
    the logs of other tasks (multiple-choice scores, not answers) cannot be replayed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no prediction logs at {directory}: pass the --output_path of the predict-only run")
    newest: dict[str, Path] = {}
    for path in sorted(directory.rglob("*_samples_*.jsonl")):
        task = SAMPLES_FILE.match(path.name)["task"]
        if task in newest:
            logger.warning(f"several prediction logs for {task}: using the newest of {newest[task].name}, {path.name}")
        if task not in newest or path.stat().st_mtime >= newest[task].stat().st_mtime:
            newest[task] = path
    if not newest:
        raise FileNotFoundError(f"no *_samples_<task>.jsonl files under {directory}: run phase 1 with --log_samples")
    predictions: dict[str, dict[int, list[str]]] = {}
    unusable: dict[str, str] = {}
    for task, path in newest.items():
        with path.open(encoding="utf-8") as handle:
            samples = [json.loads(line) for line in handle if line.strip()]
        answers = {int(sample["doc_id"]): _logged_answers(sample) for sample in samples}
        if any(value is None for value in answers.values()):
            unusable[task] = f"{path} holds scores of choices, not generated answers"
        else:
            predictions[task] = answers
    return predictions, unusable


class LoggedPredictions(lmms):
    """Replays logged answers (`--model_args predictions=DIR`, the output directory of the predict-only run)."""

    def __init__(
        self,
        predictions: str,
        batch_size: int | str = 1,  # lmms-eval passes these; replaying needs neither
        max_batch_size: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__()
        self.predictions, self.unusable = load_predictions(predictions)
        self.source = predictions
        self._served: dict[tuple[str, int], int] = defaultdict(int)
        logger.info(f"replaying predictions of {sorted(self.predictions)} from {predictions}")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """The logged answer of each request's document (the k-th answer for its k-th repeat)."""
        answers = []
        for request in requests:
            task, doc_id = request.task_name, int(request.doc_id)
            if task not in self.predictions:
                reason = self.unusable.get(task, f"it has predictions for {sorted(self.predictions)}")
                raise KeyError(f"cannot replay task {task} from {self.source}: {reason}")
            logged = self.predictions[task].get(doc_id)
            if logged is None:
                raise KeyError(
                    f"no prediction for {task} document {doc_id} in {self.source}: run both phases with the same "
                    "tasks, --limit and --offset"
                )
            served = self._served[task, doc_id]
            self._served[task, doc_id] += 1
            answers.append(logged[served % len(logged)])
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list:
        raise NotImplementedError(
            "llava_ov_manager_replay replays generated answers; multiple-choice tasks need the model"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("llava_ov_manager_replay does not replay multi-round tasks")
