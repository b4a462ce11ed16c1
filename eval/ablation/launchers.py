"""How the ablation's steps run: in this process (one import of torch, transformers and lmms-eval for all of them;
the default on CPU), or as subprocesses (`torchrun -m training`, `python -m eval run --num_processes N`; for GPU
nodes). Both run the same `python -m training` arguments and the same evaluation, and leave the same files."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..results import STABLE_NAME


class StepFailed(RuntimeError):
    """A training or evaluation step that did not finish."""


@dataclass(frozen=True)
class EvalJob:
    """One checkpoint through lmms-eval with `llava_ov_manager`; its results land in `output_dir/results.json`."""

    name: str
    checkpoint: Path
    output_dir: Path
    tasks: tuple[str, ...]
    model_args: str  # beyond pretrained=
    batch_size: int
    limit: int | None
    extra_args: tuple[str, ...] = ()  # more `python -m eval run` arguments (the subprocess launcher only)

    def cli_args(self, num_processes: int) -> list[str]:
        """The `python -m eval run` arguments of this job."""
        model_args = ",".join(part for part in (f"pretrained={self.checkpoint}", self.model_args) if part)
        args = ["--num_processes", str(num_processes)] if num_processes > 1 else []
        args += ["--model", "llava_ov_manager", "--model_args", model_args, "--tasks", ",".join(self.tasks)]
        args += ["--batch_size", str(self.batch_size), "--output_path", str(self.output_dir)]
        if self.limit is not None:
            args += ["--limit", str(self.limit)]
        return args + list(self.extra_args)


class InProcessLauncher:
    """Every step in this Python process: `training.cli.main` per stage, `evaluate_checkpoints` per variant.

    `task_manager` is lmms-eval's task index (`eval.groups.task_manager()`), built at the first evaluation if not given.
    """

    name = "inprocess"

    def __init__(self, task_manager=None) -> None:
        self._task_manager = task_manager

    def train_command(self, argv: list[str]) -> list[str]:
        return ["llava-manager", "train", *argv]

    def eval_command(self, job: EvalJob) -> list[str]:
        return ["llava-manager", "eval", "run", *job.cli_args(1)]

    def train(self, argv: list[str]) -> None:
        from training.cli import main

        main(argv)

    def evaluate(self, job: EvalJob) -> Path:
        from .. import groups
        from ..inprocess import evaluate_checkpoints

        if self._task_manager is None:
            self._task_manager = groups.task_manager()  # indexing lmms-eval's tasks takes ~10 s: once
        written = evaluate_checkpoints(
            {job.output_dir.name: job.checkpoint},
            job.output_dir.parent,
            tasks=job.tasks,
            model_args=job.model_args,
            batch_size=job.batch_size,
            limit=job.limit,
            task_manager=self._task_manager,
        )
        return written[job.output_dir.name]


class SubprocessLauncher:
    """Every step as a command: `torchrun --nproc_per_node N -m training ...` (plain `python -m training` for one
    process) and `python -m eval run --num_processes N ...`."""

    name = "subprocess"

    def __init__(self, nproc: int = 1, env: dict[str, str] | None = None) -> None:
        if nproc < 1:
            raise ValueError(f"--nproc must be at least 1, got {nproc}")
        self.nproc = nproc
        self.env = {**os.environ, **(env or {})}

    def train_command(self, argv: list[str]) -> list[str]:
        # `-m llava_manager`: unlike `-m training`, it imports the project, not a `training/` folder of the cwd.
        if self.nproc == 1:
            return [sys.executable, "-m", "llava_manager", "train", *argv]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(self.nproc),
            "-m",
            "llava_manager",
            "train",
            *argv,
        ]

    def eval_command(self, job: EvalJob) -> list[str]:
        return [sys.executable, "-m", "llava_manager", "eval", "run", *job.cli_args(self.nproc)]

    def _run(self, command: list[str]) -> None:
        print("running: " + " ".join(command), flush=True)
        code = subprocess.run(command, env=self.env, check=False).returncode
        if code != 0:
            raise StepFailed(f"exit code {code} from: {' '.join(command)}")

    def train(self, argv: list[str]) -> None:
        self._run(self.train_command(argv))

    def evaluate(self, job: EvalJob) -> Path:
        self._run(self.eval_command(job))
        return job.output_dir / STABLE_NAME


LAUNCHERS = {launcher.name: launcher for launcher in (InProcessLauncher, SubprocessLauncher)}
