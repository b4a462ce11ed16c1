"""The ablation's steps: unimodal models, stage 0, data, one per stage run, one per evaluation, the report.

Each step knows whether its work is already done, so a re-run skips it: a model directory is complete once it holds
`config.json` (the training stack moves it in last), an evaluation once its `results.json` exists (written only after
its checks pass). A step also records the arguments it ran with (`ablation_step.json`); finding finished work made
with other arguments stops the run instead of mixing results (redo with `--force`, or use another `--out`). Work
older than what it was made from (a stage whose parent was retrained since) is redone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..results import STABLE_NAME
from .launchers import EvalJob, StepFailed
from .plan import EvalRun, StageRun

RECORD = "ablation_step.json"
CONFIG = "config.json"


class AblationError(RuntimeError):
    """Finished work that does not match what this run asks for."""


@dataclass(frozen=True)
class Layout:
    """Where everything goes under `--out`."""

    root: Path

    @property
    def unimodal(self) -> Path:
        return self.root / "unimodal"

    @property
    def tower(self) -> Path:
        return self.root / "tower"

    @property
    def stage0(self) -> Path:
        return self.root / "stage0"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def stage(self, recipe: str) -> Path:
        return self.root / "stages" / recipe

    def evaluation(self, variant: str) -> Path:
        return self.root / "eval" / variant

    @property
    def report(self) -> Path:
        return self.root / "report"


def _recorded(directory: Path, spec: dict[str, Any], what: str) -> None:
    """Raise when `directory` records having been made from another `spec`."""
    path = directory / RECORD
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    if recorded != spec:
        changed = sorted(key for key in set(spec) | set(recorded) if spec.get(key) != recorded.get(key))
        details = "; ".join(f"{key}: was {recorded.get(key)!r}, now {spec.get(key)!r}" for key in changed)
        raise AblationError(
            f"{what} in {directory} was made with other settings ({details}): pass --force to redo it, "
            "or use another --out"
        )


def _record(directory: Path, spec: dict[str, Any]) -> None:
    (directory / RECORD).write_text(json.dumps(spec, indent=1))


def remove(directory: Path) -> None:
    """Delete a step's earlier output (a stale model, or anything under `--force`)."""
    shutil.rmtree(directory, ignore_errors=True)


def _newer(path: Path, than: Path | None) -> bool:
    return than is None or not than.exists() or path.stat().st_mtime >= than.stat().st_mtime


class Step(Protocol):
    label: str

    def finished(self) -> str | None:
        """Why the step can be skipped, or None when it must run."""

    def command(self) -> str:
        """What the step runs, for `--dry-run`."""

    def run(self) -> None: ...


PROBES = "probes.json"


@dataclass
class TowerStep:
    """Pretrain a SigLIP (`training.tower_pretraining`) into `directory` and probe its layers (`eval.probes`)."""

    source: Path  # the SigLIP checkpoint it starts from
    directory: Path
    seed: int
    settings: dict[str, Any]  # PretrainSettings fields, and probe_train_scenes / probe_test_scenes
    label: str = "pretrain the SigLIP (coarse + invariant to details), probe its layers"

    @property
    def spec(self) -> dict[str, Any]:
        return {"source": str(self.source), "seed": self.seed, **self.settings}

    def finished(self) -> str | None:
        probes = self.directory / PROBES
        if not probes.is_file() or not _newer(probes, self.source / CONFIG):  # written last; redo on a new source
            return None
        _recorded(self.directory, self.spec, "the pretrained SigLIP")
        return f"SigLIP and probes in {self.directory}"

    def command(self) -> str:
        return f"training.tower_pretraining.pretrain_tower + eval.probes.probe_tower: {self.source} -> {self.directory}"

    def run(self) -> None:
        from transformers import SiglipImageProcessor, SiglipVisionModel

        from training.tower_pretraining import PretrainSettings, pretrain_tower

        from ..probes import probe_gate, probe_tower

        options = dict(self.settings)
        probe_sizes = {key: options.pop(f"probe_{key}") for key in ("train_scenes", "test_scenes")}
        settings = PretrainSettings(**options)
        tower = SiglipVisionModel.from_pretrained(self.source)
        metrics = pretrain_tower(tower, settings, self.seed)
        # Stage 0 keeps the hidden states up to the one LLaVA reads (it drops the last block): probe those.
        table = probe_tower(tower, settings.preset, num_hidden_states=tower.config.num_hidden_layers, **probe_sizes)
        gate = probe_gate(table)
        print(f"probe gate: {gate.message}", flush=True)
        if not gate.passed:
            print(
                "warning: the tower's last layer still reads the details nearly as well as its intermediate layers: "
                "this world does not have the mechanism the ablation tests (a longer or stronger tower pretraining "
                "may give it)",
                flush=True,
            )
        remove(self.directory)
        tower.save_pretrained(self.directory)
        SiglipImageProcessor.from_pretrained(self.source).save_pretrained(self.directory)
        _record(self.directory, self.spec)
        record = {
            "pretraining": metrics,
            "probes": table.to_dict(),
            "gate": {"passed": gate.passed, "message": gate.message},
        }
        (self.directory / PROBES).write_text(json.dumps(record, indent=1))


@dataclass
class TinyUnimodalStep:
    """Write the tiny SigLIP and Qwen2 (`siglip/`, `qwen2/`): stage 0's inputs when no --model or --vision is given."""

    directory: Path
    seed: int = 0
    label: str = "tiny SigLIP and Qwen2"

    @property
    def vision(self) -> Path:
        return self.directory / "siglip"

    @property
    def llm(self) -> Path:
        return self.directory / "qwen2"

    def finished(self) -> str | None:
        if not all((path / CONFIG).is_file() for path in (self.vision, self.llm)):
            return None
        _recorded(self.directory, {"seed": self.seed}, "the tiny SigLIP and Qwen2")
        return f"in {self.directory}"

    def command(self) -> str:
        return f"python -m llava_integration.tiny {self.directory} --unimodal --seed {self.seed}"

    def run(self) -> None:
        from llava_integration.tiny import write_tiny_unimodal

        remove(self.directory)  # a half-written pair from an interrupted run
        write_tiny_unimodal(self.directory, self.seed)
        _record(self.directory, {"seed": self.seed})


@dataclass
class Stage0Step:
    """Assemble the stage-1 starting model from a SigLIP and a Qwen2 directory (`llava_integration.assemble`)."""

    vision: Path
    llm: Path
    directory: Path
    options: dict[str, Any]  # assemble's keyword options (grid, image_aspect_ratio, seed, dtype)
    label: str = "stage 0: assemble SigLIP + Qwen2"

    @property
    def spec(self) -> dict[str, Any]:
        return {"vision": str(self.vision), "llm": str(self.llm), **self.options}

    def finished(self) -> str | None:
        config = self.directory / CONFIG
        if not config.is_file() or not all(_newer(config, path / CONFIG) for path in (self.vision, self.llm)):
            return None  # not assembled yet, or from older unimodal models: assemble again
        _recorded(self.directory, self.spec, "the stage-0 model")
        return f"model in {self.directory}"

    def command(self) -> str:
        options = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in self.options.items())
        return (
            f"python -m llava_integration.assemble --vision {self.vision} --llm {self.llm} {options} {self.directory}"
        )

    def run(self) -> None:
        from llava_integration.assemble import assemble
        from manager_plugin.io import ConversionError

        remove(self.directory)
        try:
            assemble(self.vision, self.llm, self.directory, **self.options)
        except ConversionError as error:
            raise StepFailed(f"stage 0: {error}") from error
        _record(self.directory, self.spec)


@dataclass
class SyntheticDataStep:
    """Write the synthetic dataset (the data when no --data is given): images, records and stage mixtures."""

    directory: Path
    options: dict[str, Any]
    label: str = "synthetic data"

    def finished(self) -> str | None:
        if not (self.directory / "stage2.yaml").is_file():  # the writer's last file
            return None
        _recorded(self.directory, self.options, "the synthetic data")
        return f"in {self.directory}"

    def command(self) -> str:
        options = " ".join(f"--{key} {value}" for key, value in self.options.items())
        return f"python -m training.synthetic {self.directory} {options}".strip()

    def run(self) -> None:
        from training.synthetic import write_synthetic

        write_synthetic(self.directory, **self.options)
        _record(self.directory, self.options)


@dataclass
class StageStep:
    """Train one stage run with `python -m training` arguments `argv` into `directory`."""

    run_spec: StageRun
    argv: list[str]
    directory: Path
    parent_directory: Path | None
    launcher: Any

    @property
    def label(self) -> str:
        variants = ", ".join(self.run_spec.variants)
        return f"train {self.run_spec.recipe} ({variants})"

    def finished(self) -> str | None:
        config = self.directory / CONFIG
        if not config.is_file():
            return None
        if not _newer(config, None if self.parent_directory is None else self.parent_directory / CONFIG):
            return None  # trained from an older model of its parent: train it again
        _recorded(self.directory, {"argv": self.argv}, f"stage {self.run_spec.recipe}")
        return f"model in {self.directory}"

    def command(self) -> str:
        return " ".join(self.launcher.train_command(self.argv))

    def prepare(self) -> list[str]:
        """Clear a stale model away; the training arguments to run (resuming an interrupted run)."""
        argv = list(self.argv)
        if (self.directory / CONFIG).is_file():  # a model made from an older parent: none of it is reusable
            remove(self.directory)
        elif any(self.directory.glob("checkpoint-*")) and "--resume_from_checkpoint" not in argv:
            argv += ["--resume_from_checkpoint", "true"]  # an interrupted run: go on from its last checkpoint
        return argv

    def complete(self) -> None:
        """Check that the training wrote its model, and record what it was made with."""
        if not (self.directory / CONFIG).is_file():
            raise StepFailed(f"stage {self.run_spec.recipe} ended without writing its model to {self.directory}")
        _record(self.directory, {"argv": self.argv})

    def run(self) -> None:
        self.launcher.train(self.prepare())
        self.complete()


@dataclass
class EvalStep:
    """Evaluate one variant's final model."""

    run_spec: EvalRun
    job: EvalJob
    launcher: Any

    @property
    def label(self) -> str:
        return f"evaluate {self.run_spec.variant} ({self.run_spec.recipe}) on {','.join(self.job.tasks)}"

    @property
    def spec(self) -> dict[str, Any]:
        job = self.job
        return {"checkpoint": str(job.checkpoint), "tasks": list(job.tasks), "model_args": job.model_args,
                "limit": job.limit, "extra_args": list(job.extra_args)}  # fmt: skip

    def finished(self) -> str | None:
        results = self.job.output_dir / STABLE_NAME
        if not results.is_file() or not _newer(results, self.job.checkpoint / CONFIG):
            return None
        _recorded(self.job.output_dir, self.spec, f"the evaluation of {self.run_spec.variant}")
        return f"results in {results}"

    def command(self) -> str:
        return " ".join(self.launcher.eval_command(self.job))

    def run(self) -> None:
        (self.job.output_dir / STABLE_NAME).unlink(missing_ok=True)
        path = self.launcher.evaluate(self.job)
        if not path.is_file():
            raise StepFailed(f"the evaluation of {self.run_spec.variant} wrote no {path}")
        _record(self.job.output_dir, self.spec)
