"""`llava-manager eval {ablation,run,report,manager-weights,tasks,include-path}` (or `python -m eval ...`): run the
ablation, evaluate, tabulate it, show what managers learned."""

from __future__ import annotations

import argparse
import sys

from . import TASKS_DIR

USAGE = """usage: {prog} COMMAND ...

  ablation [OPTIONS]                 the grid vs manager ablation end to end: train the four variants, evaluate,
                                     report (no options: the tiny one on CPU, 6-7 minutes; see --help)
  run LMMS_EVAL_ARGS...              lmms-eval (`python -m lmms_eval`) with this package's tasks; exits non-zero
                                     when a task failed or produced no result
  report VARIANT=RUN... --out DIR    the ablation table (markdown, CSV) and plot; VARIANT: baseline, manager,
                                     grid, grid_manager; RUN: a results JSON or an lmms-eval --output_path
  manager-weights CHECKPOINT --out DIR
                                     heatmap of the weight each manager gives each vision layer
  tasks [GROUP...]                   the tasks of this package's groups, as the installed lmms-eval knows them
  include-path                       the task directory to give `python -m lmms_eval --include_path`
"""


def _report(argv: list[str], prog: str) -> int:
    from .benchmarks import load_table
    from .report import parse_runs, write_report

    parser = argparse.ArgumentParser(prog=prog, description="The grid vs manager ablation report.")
    parser.add_argument("runs", nargs="+", metavar="VARIANT=RUN")
    parser.add_argument("--out", required=True, help="directory for ablation.md, ablation.csv, ablation.png")
    args = parser.parse_args(argv)
    _, paths = write_report(parse_runs(args.runs, load_table()), args.out)
    print("\n".join(f"wrote {path}" for path in paths))
    return 0


def _manager_weights(argv: list[str], prog: str) -> int:
    from .manager_weights import write_manager_weights

    parser = argparse.ArgumentParser(
        prog=prog, description="Heatmap and table of the weight each manager gives each vision layer."
    )
    parser.add_argument("checkpoint", help="a merged checkpoint or a manager adapter directory")
    parser.add_argument("--out", required=True, help="directory for manager_weights.png and manager_weights.csv")
    args = parser.parse_args(argv)
    paths = write_manager_weights(args.checkpoint, args.out)
    print("\n".join(f"wrote {path}" for path in paths))
    return 0


def _tasks(argv: list[str], prog: str) -> int:
    from .groups import PACKAGE_GROUPS, describe, protocol_tasks, task_manager

    parser = argparse.ArgumentParser(
        prog=prog, description="The tasks of this package's groups, as lmms-eval knows them."
    )
    parser.add_argument("groups", nargs="*", metavar="GROUP", help=f"default: {', '.join(PACKAGE_GROUPS)}")
    groups = parser.parse_args(argv).groups
    manager = task_manager()
    for group in groups or PACKAGE_GROUPS:
        names = protocol_tasks(manager, group)
        print(f"{group}: {len(names)} tasks")
        for name in names:
            entry = describe(manager, name)
            detail = f" -> {', '.join(entry.leaves)}" if entry.leaves else ""
            print(f"  {name:22s} {entry.kind}{detail}")
    return 0


def _include_path(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="The task directory for lmms-eval's --include_path.")
    parser.parse_args(argv)
    print(TASKS_DIR)
    return 0


def _ablation(argv: list[str], prog: str) -> int:
    from .ablation.main import main as ablation_main

    return ablation_main(argv, prog=prog)


def _run(argv: list[str], prog: str) -> int:
    from . import run as wrapper

    if argv in (["-h"], ["--help"]):
        print(f"usage: {prog} LMMS_EVAL_ARGS...\n\n{wrapper.__doc__}")
        return 0
    return wrapper.run(argv, prog=prog)


COMMANDS = {
    "ablation": _ablation,
    "run": _run,
    "report": _report,
    "manager-weights": _manager_weights,
    "tasks": _tasks,
    "include-path": _include_path,
}


def main(argv: list[str] | None = None, prog: str = "python -m eval") -> int:
    """Dispatch `argv` to one of the evaluation commands; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(prog=prog))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}: expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest, f"{prog} {command}")


if __name__ == "__main__":
    from llava_manager.cli import run_main

    sys.exit(run_main(main, prog="python -m eval"))
