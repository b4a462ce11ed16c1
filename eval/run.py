"""`python -m eval run LMMS_EVAL_ARGS...`: lmms-eval's CLI, failing loudly when a task fails or yields no result.

lmms-eval 0.7.3 catches every evaluation error, prints it and exits 0, so a failed run looks like a successful one to
scripts. This wrapper runs the real CLI (`python -m lmms_eval`) with the same arguments, adds this package's task
directory as `--include_path`, then checks the results file the run wrote: every requested task (a group: each of
its tasks) must be present, have evaluated at least one document and, unless `--predict_only`, have a score. A copy
of the results lands at `<output_path>/results.json`. The wrapper's own option `--num_processes N` runs N processes
(one per GPU) under `accelerate launch`.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from llava_manager.cli import UsageError
from llava_manager.models import check_model_reference
from manager_plugin.io import write_atomically

from . import TASKS_DIR
from .results import RESULTS_GLOB, STABLE_NAME, Results, add_provenance, load_results

UNSCORED_METRICS = frozenset({"submission", "bypass"})  # written to a file for a server / skipped in predict-only
LMMS_EVAL = ("-m", "lmms_eval")
_COLOUR_CODES = re.compile(r"\x1b\[[0-9;]*m")


def _pop_num_processes(argv: list[str]) -> tuple[int, list[str]]:
    """The wrapper's own `--num_processes N` (data-parallel processes under `accelerate launch`), and the rest."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--num_processes", type=int, default=1)
    known, rest = parser.parse_known_args(argv)
    if known.num_processes < 1:
        raise UsageError(f"--num_processes must be at least 1, got {known.num_processes}")
    return known.num_processes, rest


def lmms_eval_command(num_processes: int) -> tuple[str, ...]:
    """How to start lmms-eval: plainly, or under `accelerate launch` for several processes (one per GPU)."""
    if num_processes == 1:
        return (sys.executable, *LMMS_EVAL)
    return (sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes), *LMMS_EVAL)


def _wrapper_view(argv: list[str]) -> argparse.Namespace:
    """The few lmms-eval arguments the wrapper itself needs; everything is passed on unchanged."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tasks")
    parser.add_argument("--model")
    parser.add_argument("--model_args")
    parser.add_argument("--output_path")
    parser.add_argument("--include_path")
    parser.add_argument("--predict_only", "-x", action="store_true")
    parser.add_argument("--log_samples", action="store_true")
    return parser.parse_known_args(argv)[0]


def check_results(results: Results, requested: list[str], predict_only: bool, output_dir: Path) -> list[str]:
    """Why the run failed: one line per requested task that is missing, evaluated nothing, or has no score."""
    problems = []
    for name in requested:
        if "*" in name:
            if not fnmatch.filter(results.tasks, name):
                problems.append(f"{name}: no task matching it has results")
            continue
        if name not in results.tasks and name not in results.subtasks:
            problems.append(f"{name}: no results (the task was not evaluated)")
            continue
        for task in results.leaves(name):
            if task not in results.tasks:
                problems.append(f"{task} (in {name}): no results")
            elif results.samples.get(task, 0) == 0:
                problems.append(f"{task}: evaluated no documents")
            elif predict_only:
                if not list(output_dir.rglob(f"*_samples_{task}.jsonl")):
                    problems.append(f"{task}: no logged predictions (*_samples_{task}.jsonl) under {output_dir}")
            else:
                metrics = [entry["metric"] for entry in results.configs.get(task, {}).get("metric_list", [])]
                scored = [metric for metric in metrics if metric not in UNSCORED_METRICS]
                values = [
                    results.value(task, key)
                    for key in results.tasks[task]
                    if key.split(",")[0] in scored and "_stderr" not in key
                ]
                if scored and all(value is None for value in values):
                    problems.append(f"{task}: no score for {scored} (got {results.tasks[task]})")
    return problems


def _stream(command: list[str], keep: int = 40) -> tuple[int, list[str]]:
    """Run `command`, echoing its output as it comes; return its exit code and its last `keep` lines."""
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    # PYTHONSAFEPATH: the working directory may hold an `eval/` output folder, which must not hide this package.
    environment = {**os.environ, "PYTHONSAFEPATH": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=environment
    ) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            tail.append(_COLOUR_CODES.sub("", line.rstrip("\n")))
    return process.returncode, list(tail)


def check_model_args(model: str | None, model_args: str | None) -> None:
    """Refuse, before lmms-eval starts, a `pretrained=` / `manager=` of this package's model that is not a model."""
    if model != "llava_ov_manager" or not model_args:
        return
    for item in model_args.split(","):
        key, _, value = item.partition("=")
        if key.strip() in ("pretrained", "manager") and value.strip():
            check_model_reference(value.strip(), f"--model_args {key.strip()}=")


def run(argv: list[str], command: tuple[str, ...] | None = None, prog: str = "python -m eval run") -> int:
    """Run lmms-eval with `argv`; return 0 only when every requested task produced results.

    `--num_processes N` (the wrapper's own option) starts N processes with `accelerate launch`; `command` replaces
    the lmms-eval command line altogether. The copy at `OUTPUT/results.json` also records its provenance. A missing
    option or a model that is not there is a `UsageError`.
    """
    num_processes, argv = _pop_num_processes(argv)
    command = command or lmms_eval_command(num_processes)
    view = _wrapper_view(argv)
    if not view.output_path:
        raise UsageError(f"{prog} needs --output_path DIR (where lmms-eval writes the results it checks)")
    if not view.tasks:
        raise UsageError(f"{prog} needs --tasks NAMES")
    check_model_args(view.model, view.model_args)
    args = list(argv)
    if view.include_path is None:
        args += ["--include_path", str(TASKS_DIR)]
    else:
        print(
            f"note: --include_path {view.include_path} replaces this package's tasks ({TASKS_DIR}); "
            "its groups and manager_tiny are only found if that directory holds them",
            file=sys.stderr,
        )
    output_dir = Path(view.output_path)
    before = set(output_dir.rglob(RESULTS_GLOB)) if output_dir.is_dir() else set()
    started = time.time()
    print("running:", " ".join([*command, *args]), flush=True)
    returncode, tail = _stream([*command, *args])

    written = sorted(set(output_dir.rglob(RESULTS_GLOB)) - before, key=lambda path: path.stat().st_mtime)
    errors = [line for line in tail if "Error during evaluation" in line or line.startswith("Traceback")]
    if returncode != 0 or not written:
        reason = f"exited with code {returncode}" if returncode != 0 else "wrote no results file"
        print(f"\nFAILED: lmms-eval {reason} after {time.time() - started:.0f}s.", file=sys.stderr)
        for line in errors[-3:]:
            print(f"  {line}", file=sys.stderr)
        return 1
    results = load_results(written[-1])
    problems = check_results(results, view.tasks.split(","), view.predict_only, output_dir)
    if problems:
        print(f"\nFAILED: {len(problems)} problem(s) in {written[-1]}:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    recorded = add_provenance(json.loads(written[-1].read_text()))
    write_atomically(output_dir / STABLE_NAME, lambda path: Path(path).write_text(json.dumps(recorded, indent=2)))
    print(f"\nOK: results in {output_dir / STABLE_NAME} (lmms-eval wrote {written[-1]})")
    return 0
