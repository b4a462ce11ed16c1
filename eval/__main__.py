"""`python -m eval {ablation,run,report,manager-weights,tasks}`: run the ablation, evaluate, tabulate it, show what
managers learned."""

from __future__ import annotations

import argparse
import sys

from . import TASKS_DIR

USAGE = """python -m eval COMMAND ...

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


def _report(argv: list[str]) -> int:
    from .benchmarks import load_table
    from .report import parse_runs, write_report

    parser = argparse.ArgumentParser(prog="python -m eval report", description="The grid vs manager ablation report.")
    parser.add_argument("runs", nargs="+", metavar="VARIANT=RUN")
    parser.add_argument("--out", required=True, help="directory for ablation.md, ablation.csv, ablation.png")
    args = parser.parse_args(argv)
    try:
        _, paths = write_report(parse_runs(args.runs, load_table()), args.out)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(f"wrote {path}" for path in paths))
    return 0


def _manager_weights(argv: list[str]) -> int:
    from .manager_weights import write_manager_weights

    parser = argparse.ArgumentParser(prog="python -m eval manager-weights", description=__doc__)
    parser.add_argument("checkpoint", help="a merged checkpoint or a manager adapter directory")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        paths = write_manager_weights(args.checkpoint, args.out)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(f"wrote {path}" for path in paths))
    return 0


def _tasks(argv: list[str]) -> int:
    from .groups import PACKAGE_GROUPS, describe, protocol_tasks, task_manager

    manager = task_manager()
    for group in argv or PACKAGE_GROUPS:
        names = protocol_tasks(manager, group)
        print(f"{group}: {len(names)} tasks")
        for name in names:
            entry = describe(manager, name)
            detail = f" -> {', '.join(entry.leaves)}" if entry.leaves else ""
            print(f"  {name:22s} {entry.kind}{detail}")
    return 0


def _include_path(argv: list[str]) -> int:
    print(TASKS_DIR)
    return 0


def _ablation(argv: list[str]) -> int:
    from .ablation.main import main as ablation_main

    return ablation_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "ablation": _ablation,
        "report": _report,
        "manager-weights": _manager_weights,
        "tasks": _tasks,
        "include-path": _include_path,
    }
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from . import run as wrapper

        if rest in (["-h"], ["--help"]):
            print(wrapper.__doc__)
            return 0
        return wrapper.run(rest)
    if command not in commands:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return commands[command](rest)


if __name__ == "__main__":
    sys.exit(main())
