"""`llava-manager COMMAND ...`: every command of the project behind one console command.

Each command is one entry in `COMMANDS` (a `module:function` imported only when that command runs). Every command,
whether typed as `llava-manager COMMAND` or as its `python -m MODULE` form, runs through `run_main`: a user's mistake
(a bad name, choice, path or combination; the project raises `ValueError` or a missing-file `OSError` for those) is
one `error:` line and exit status 2, and only a real bug shows a traceback. `--debug` (or `LLAVA_MANAGER_DEBUG=1`)
shows the traceback of every error.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROGRAM = "llava-manager"
DEBUG_VARIABLE = "LLAVA_MANAGER_DEBUG"
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


class UsageError(ValueError):
    """A command-line value that is not what the command expects; the message names the value and what was wanted."""


@dataclass(frozen=True)
class Command:
    """One subcommand: where its `main(argv, prog=...)` lives (imported when it runs) and a line for the listing."""

    target: str  # "module:function"
    summary: str


COMMANDS: dict[str, Command] = {
    "demo": Command("llava_integration.demo:main", "patch, forward and generate with a manager (tiny)"),
    "ablation": Command("eval.ablation.main:main", "the grid vs manager ablation end to end (tiny on CPU by default)"),
    "train": Command("training.cli:main", "train one stage from a recipe (stage1 / 1.5 / 2, grid, manager)"),
    "eval": Command("eval.__main__:main", "evaluate with lmms-eval: run, report, tasks, manager-weights, ..."),
    "convert": Command("llava_integration.convert:main", "LLaVA-NeXT checkpoints <-> HF + manager"),
    "bench": Command("benchmarks.manager_cost:main", "measure what the manager costs (time, memory)"),
    "bench-throughput": Command("benchmarks.throughput:main", "evaluation documents/s against lmms-eval's llava_hf"),
    "assemble": Command("llava_integration.assemble:main", "stage 0: LLaVA-OneVision from a SigLIP and a Qwen2"),
    "tiny": Command("llava_integration.tiny:main", "write the tiny LLaVA-OneVision model"),
    "data": Command("training.synthetic.__main__:main", "write the synthetic training data"),
    "script": Command("llava_manager.shell:main", "run a shipped cluster / evaluation script"),
    "managertower-train": Command("training.managertower.cli:main", "train / evaluate ManagerTower on one task"),
    "managertower-convert": Command(
        "manager_plugin.managertower.convert:main",
        "ManagerTower / BridgeTower Lightning .ckpt -> HF",
    ),
    "managertower-tiny": Command("manager_plugin.managertower.tiny:main", "write a tiny ManagerTower"),
}


def usage() -> str:
    """The top-level help: the commands, one a line."""
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROGRAM} [--debug] COMMAND [ARGS...]   ({PROGRAM} COMMAND --help for a command's options)",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()),
        "",
        "--debug (or LLAVA_MANAGER_DEBUG=1) shows the traceback of any error. Offline: HF_HUB_OFFLINE=1.",
    ]
    return "\n".join(lines)


def report_error(error: BaseException) -> None:
    """A user's mistake as `error: ...` on stderr (further lines of a long message, e.g. bad records, below it)."""
    print(f"error: {str(error) or type(error).__name__}", file=sys.stderr)


def debugging() -> bool:
    """Whether errors should show their traceback (`--debug` or LLAVA_MANAGER_DEBUG=1)."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _not_cpu_fallback_notice(record: logging.LogRecord) -> bool:
    """False for DeepSpeed's notice that it runs on the CPU, on a machine that has no CUDA device anyway."""
    if not record.getMessage().startswith("Setting accelerator to CPU"):
        return True
    import torch

    return torch.cuda.is_available()


def quiet_libraries() -> None:
    """Silence library notices a user cannot act on: DeepSpeed announcing the CPU on a machine without a GPU, and
    transformers' deprecation of `is_gradient_checkpointing`, which PEFT reads when LoRA is applied."""
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if _not_cpu_fallback_notice not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_not_cpu_fallback_notice)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def run_main(function: Callable[..., object], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run a command's `main(argv, prog=...)` and turn its outcome into an exit status (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    accepts_prog = "prog" in inspect.signature(function).parameters
    quiet_libraries()
    try:
        result = function(argv, prog=prog) if accepts_prog and prog else function(argv)
    except USER_ERRORS as error:
        if debugging():
            raise
        report_error(error)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        close_process_group()
    return result if isinstance(result, int) else 0


def close_process_group() -> None:
    """Destroy torch.distributed's default process group if a command (a training stage under torchrun) made one.

    Left alive, its communication threads are torn down with the interpreter, and gloo then can abort the process
    ("terminate called without an active exception") after the work is done, failing the launcher."""
    distributed = sys.modules.get("torch.distributed")  # imported by the command only: the CLI stays light
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def resolve(target: str) -> Callable[..., object]:
    """The function a `module:function` target names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def drop_working_directory() -> None:
    """Take the working directory off `sys.path` (where `python -m` puts it), unless this project lives there.

    A run's outputs may be folders named like the project's packages (`eval/`, `training/`, `benchmarks/`); Python
    would import those folders instead of the packages."""
    here = Path.cwd().resolve()
    if Path(__file__).resolve().parents[1] == here:
        return
    sys.path[:] = [entry for entry in sys.path if entry not in ("", ".") and Path(entry).resolve() != here]


def main(argv: list[str] | None = None) -> int:
    """The console command: `llava-manager [--debug] COMMAND [ARGS...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:
        os.environ[DEBUG_VARIABLE] = "1"  # in the environment, so that subprocesses of the command inherit it
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}: expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_main(resolve(COMMANDS[name].target), rest, prog=f"{PROGRAM} {name}")
