"""The production configuration rehearsed on CPU: 2 ranks under torchrun (gloo), DeepSpeed ZeRO-3, bf16, gradient
checkpointing, AdamW, the manager's jitter (0.01), periodic saves, through the manager chain stage1_manager ->
stage1.5_manager -> stage2_manager on the tiny model and synthetic data mixing image and text-only samples. Each stage
starts from the previous one's output, so the manager is restored inside `deepspeed.zero.Init`. Stage 2 is killed
(SIGKILL, both ranks) after its first checkpoint and resumed through DeepSpeed's checkpoint; the same with ZeRO-2.

Run as a script, this file is the torchrun worker (`PHASE WORK TINY DATA`). Marked `rehearsal` (not in the default
run): `python -m pytest -m rehearsal tests/test_training_rehearsal.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from llava_manager.cli import close_process_group

REPO = Path(__file__).resolve().parents[1]
STAGE2_STEPS, SAVE_STEPS = 4, 2
# Each stage: the recipe, the stage it starts from ("tiny": the tiny model) and its steps.
CHAIN = {
    "stage1_manager": ("tiny", 2),
    "stage1.5_manager": ("stage1_manager", 2),
    "stage2_manager": ("stage1.5_manager", STAGE2_STEPS),
}
KILL_AFTER_STEP = "REHEARSAL_KILL_AFTER_STEP"


def stage_args(recipe: str, model: str, data: str, output: str, steps: int, deepspeed: str, *extra: str) -> list[str]:
    """The recipe's own settings (bf16, gradient checkpointing, AdamW, jitter 0.01, cosine) on a tiny budget."""
    data_file = "captions8.json" if recipe.startswith("stage1_") else "mixed.json"
    return [
        "--recipe", recipe, "--model_name_or_path", model, "--data_path", f"{data}/{data_file}",
        "--image_folder", data, "--output_dir", output, "--deepspeed", deepspeed, "--bf16", "true",
        "--global_batch_size", "4", "--per_device_train_batch_size", "2", "--max_steps", str(steps),
        "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS), "--warmup_steps", "0",
        # Rates large enough that every step moves bf16 weights (the recipes' 1e-5 is below bf16's resolution here).
        "--learning_rate", "1e-3", "--vision_tower_lr", "1e-3", "--manager_lr", "1e-2",
        "--report_to", "none", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


# -- the torchrun worker ----------------------------------------------------------------------------------------------
def _gathered_state(model) -> dict:
    """Every parameter of `model` in full (gathered from the ZeRO-3 partitions), as fp32 CPU tensors."""
    import deepspeed
    import torch

    parameters = list(model.parameters())
    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None, enabled=hasattr(parameters[0], "ds_id")):
        return {name: p.detach().to("cpu", torch.float32).clone() for name, p in model.named_parameters()}


def _install_observer(work: Path) -> list:
    """Make the stages' trainer record the model it starts from and the model it ends with, and die when told."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    import training.run
    from training.trainer import StageTrainer

    trainers: list = []

    class Killer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ.get(KILL_AFTER_STEP, "-1")):
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as when a node is lost

    class ObservedTrainer(StageTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Killer())
            trainers.append(self)
            start = _gathered_state(self.model)  # as loaded (under zero.Init on ZeRO-3), before any step
            if dist.get_rank() == 0:
                torch.save(start, work / f"{Path(self.args.output_dir).name}.start.pt")

    training.run.StageTrainer = ObservedTrainer
    return trainers


def worker(phase: str, work: str, tiny: str, data: str) -> None:
    """One rank of a phase: `chain` (ZeRO-3, three stages), `zero2` (stage 2 unbroken), `kill-zero3` / `kill-zero2`
    (stage 2 dies after its first checkpoint), `resume-zero3` / `resume-zero2`. Each phase is a fresh launch, as a
    resumed run is: the unbroken and the broken run then share their history up to the kill."""
    import torch
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    from training.cli import main

    work_dir = Path(work)
    trainers = _install_observer(work_dir)

    def run(name: str, recipe: str, model: str, steps: int, deepspeed: str, *extra: str) -> None:
        main(stage_args(recipe, model, data, f"{work}/{name}", steps, deepspeed, *extra))
        end = _gathered_state(trainers[-1].model)
        if dist.get_rank() == 0:
            torch.save(end, work_dir / f"{name}.end.pt")
        AcceleratorState._reset_state()  # the next Trainer brings its own DeepSpeed plugin

    stage2 = ("stage2_manager", f"{work}/zero3-stage1.5_manager", STAGE2_STEPS)
    if phase == "chain":  # ZeRO-3, each stage from the previous one's output
        for recipe, (parent, steps) in CHAIN.items():
            run(f"zero3-{recipe}", recipe, tiny if parent == "tiny" else f"{work}/zero3-{parent}", steps, "zero3")
    elif phase == "zero2":
        run("zero2-stage2_manager", *stage2, "zero2")
    elif phase.startswith("kill-"):
        os.environ[KILL_AFTER_STEP] = str(SAVE_STEPS)
        stage = phase.removeprefix("kill-")
        run(f"{stage}-stage2_manager-killed", *stage2, stage)
    elif phase.startswith("resume-"):
        stage = phase.removeprefix("resume-")
        run(f"{stage}-stage2_manager-killed", *stage2, stage, "--resume_from_checkpoint", "true")
    else:
        raise ValueError(f"unknown phase {phase!r}")


if __name__ == "__main__":
    worker(*sys.argv[1:5])
    close_process_group()  # as the commands do: a live gloo group can abort the process at exit
    sys.exit(0)

# -- the tests --------------------------------------------------------------------------------------------------------
import pytest
import torch
from test_training_distributed import run_on_two_ranks

from llava_integration import load_model
from training.synthetic import write_synthetic

pytestmark = [pytest.mark.rehearsal, pytest.mark.timeout(1800), pytest.mark.usefixtures("single_thread")]


def launch(phase: str, work: Path, tiny: Path, data: Path) -> subprocess.CompletedProcess:
    return run_on_two_ranks(__file__, [phase, str(work), str(tiny), str(data)], timeout=900)


def losses(output: Path) -> dict[int, float]:
    state = json.loads((output / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def rehearsal(tiny_dir, tmp_path_factory):
    """Run every phase once; the tests below read what they left (and what the killed runs left before resuming)."""
    data = tmp_path_factory.mktemp("data")
    write_synthetic(data, seed=3, num_scenes=9)
    mixed = json.loads((data / "qa.json").read_text())[:5]
    mixed += [json.loads(line) for line in (data / "text.jsonl").read_text().splitlines()[:3]]
    (data / "mixed.json").write_text(json.dumps(mixed))
    (data / "captions8.json").write_text(json.dumps(json.loads((data / "captions.json").read_text())[:8]))
    work = tmp_path_factory.mktemp("rehearsal")
    outcomes, left_by_kill = {}, {}
    for phase in ("chain", "zero2", "kill-zero3", "kill-zero2", "resume-zero3", "resume-zero2"):
        outcomes[phase] = launch(phase, work, tiny_dir, data)
        if phase.startswith("kill-"):
            killed = work / f"{phase.removeprefix('kill-')}-stage2_manager-killed"
            left_by_kill[phase] = sorted(path.name for path in killed.iterdir())
    return work, outcomes, left_by_kill


def test_every_run_finishes_and_the_killed_runs_died_after_a_checkpoint(rehearsal):
    work, outcomes, left_by_kill = rehearsal
    for phase, done in outcomes.items():
        if phase.startswith("kill-"):
            assert done.returncode != 0 and "SIGKILL" in done.stdout + done.stderr, phase
            assert left_by_kill[phase] == [f"checkpoint-{SAVE_STEPS}"], phase  # no final model, one checkpoint
        else:
            assert done.returncode == 0, f"{phase}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    for name in [f"zero3-{recipe}" for recipe in CHAIN] + ["zero2-stage2_manager"]:
        assert json.loads((work / name / "config.json").read_text())["dtype"] == "bfloat16", name  # trained in bf16
        assert not list((work / name).glob("checkpoint-*")), name  # removed once the model is published


@pytest.mark.parametrize("stage", ["zero3", "zero2"])
def test_the_resumed_run_has_the_unbroken_runs_losses(rehearsal, stage):
    """Exactly, in bf16 too: the DeepSpeed checkpoint holds the fp32 master weights and optimizer states, the HF one
    the RNG states (jitter, data order) of each rank, so the resumed steps redo the same arithmetic."""
    work, _, _ = rehearsal
    unbroken, resumed = losses(work / f"{stage}-stage2_manager"), losses(work / f"{stage}-stage2_manager-killed")
    assert sorted(unbroken) == sorted(resumed) == list(range(1, STAGE2_STEPS + 1))
    assert resumed == unbroken
    assert unbroken[STAGE2_STEPS] < unbroken[1]  # it trains


def test_each_stage_starts_from_the_previous_ones_model_with_its_manager(rehearsal):
    """The manager (and every other weight) of stage N's saved model is what stage N+1 holds before its first step,
    loaded under `deepspeed.zero.Init` and gathered from the partitions."""
    work, _, _ = rehearsal
    previous = None
    for recipe in CHAIN:
        start = torch.load(work / f"zero3-{recipe}.start.pt")
        if previous is not None:
            saved = load_model(work / f"zero3-{previous}", dtype=torch.float32).state_dict()
            manager = [name for name in start if ".manager." in name]
            assert manager and all(saved[name].abs().sum() > 0 for name in manager)  # a trained manager, not zeros
            for name, tensor in start.items():
                assert torch.equal(tensor, saved[name]), (recipe, name)
        previous = recipe


@pytest.mark.parametrize(
    "name", [f"zero3-{recipe}" for recipe in CHAIN] + ["zero2-stage2_manager", "zero3-stage2_manager-killed"]
)
def test_the_final_weights_are_those_reloaded_from_the_saved_model(rehearsal, name):
    """Manager, projector, LLM and vision tower: the trained bf16 weights (gathered from every rank) are the saved ones,
    and every part the recipe trains has moved."""
    work, _, _ = rehearsal
    end, start = torch.load(work / f"{name}.end.pt"), torch.load(work / f"{name}.start.pt")
    reloaded = load_model(work / name, dtype=torch.bfloat16).state_dict()
    assert set(end) <= set(reloaded)
    for key, tensor in end.items():
        assert torch.equal(reloaded[key].float(), tensor), key
    for part in ("model.manager.", "model.multi_modal_projector.", "model.language_model.", "model.vision_tower."):
        moved = [not torch.equal(end[key], start[key]) for key in end if key.startswith(part)]
        trains = part != "model.vision_tower." and part != "model.language_model." or "stage1_" not in name
        assert moved and any(moved) == trains, (name, part)
