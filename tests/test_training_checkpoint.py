"""Checkpoints: a run killed after a checkpoint and resumed matches an unbroken run step for step; a checkpoint
is never left half-written; bad data stops a run before any training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_integration import load_model
from training import cli
from training.data import BadDataError
from training.synthetic import write_synthetic
from training.trainer import StageTrainer

pytestmark = pytest.mark.usefixtures("single_thread")  # the tiny model is fastest on one thread

STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Eight records (two global batches of four): image, two-image and text-only samples."""
    directory = tmp_path_factory.mktemp("data")
    write_synthetic(directory, seed=2, num_scenes=8)
    records = (
        json.loads((directory / "qa.json").read_text())[:5] + json.loads((directory / "multi.json").read_text())[:1]
    )
    records += [json.loads(line) for line in (directory / "text.jsonl").read_text().splitlines()[:2]]
    (directory / "mixed.json").write_text(json.dumps(records))
    return directory


def args(tiny_dir, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--recipe", "stage1.5_manager", "--model_name_or_path", str(tiny_dir),
        "--data_path", str(data / "mixed.json"), "--image_folder", str(data), "--output_dir", str(output),
        "--global_batch_size", "4", "--per_device_train_batch_size", "2", "--max_steps", str(STEPS),
        "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2",
        "--learning_rate", "1e-3", "--manager_lr", "1e-2", "--warmup_steps", "0",
        "--gradient_checkpointing", "false", "--report_to", "none", "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


class Killed(Exception):
    """Stands for the process dying."""


@pytest.mark.parametrize("variant", [(), ("--lora_r", "4")], ids=["full", "lora"])
def test_killed_and_resumed_run_matches_an_unbroken_run(tiny_dir, data, tmp_path, monkeypatch, variant):
    unbroken = cli.main(args(tiny_dir, data, tmp_path / "unbroken", *variant))
    assert unbroken.global_step == STEPS

    real_step = StageTrainer.training_step

    def dies_in_step_three(self, *a, **k):
        if self.state.global_step == 2:  # after checkpoint-2 was written
            raise Killed
        return real_step(self, *a, **k)

    monkeypatch.setattr(StageTrainer, "training_step", dies_in_step_three)
    with pytest.raises(Killed):
        cli.main(args(tiny_dir, data, tmp_path / "broken", *variant))
    monkeypatch.setattr(StageTrainer, "training_step", real_step)
    checkpoint = tmp_path / "broken" / "checkpoint-2"
    for name in ("config.json", "model.safetensors", "manager.safetensors", "manager_config.json", "optimizer.pt",
                 "scheduler.pt", "rng_state.pth", "trainer_state.json", "processor_config.json"):  # fmt: skip
        assert (checkpoint / name).is_file(), name
    assert not (tmp_path / "broken" / "config.json").exists()  # no final model: the run never finished
    load_model(checkpoint)  # a checkpoint is a loadable merged model

    resumed = cli.main(args(tiny_dir, data, tmp_path / "broken", *variant, "--resume_from_checkpoint", "true"))
    assert resumed.global_step == STEPS
    steps = {entry["step"]: entry["loss"] for entry in unbroken.log_history if "loss" in entry}
    resumed_steps = {entry["step"]: entry["loss"] for entry in resumed.log_history if "loss" in entry}
    for step in (3, 4):
        assert resumed_steps[step] == pytest.approx(steps[step], rel=1e-5, abs=1e-6), step
    final, reference = load_model(tmp_path / "broken").state_dict(), load_model(tmp_path / "unbroken").state_dict()
    for key, tensor in reference.items():
        torch.testing.assert_close(final[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    assert sorted(p.name for p in (tmp_path / "broken").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]


def test_a_checkpoint_that_fails_while_saving_never_appears(tiny_dir, data, tmp_path, monkeypatch):
    import training.trainer

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(training.trainer, "save_manager", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cli.main(args(tiny_dir, data, tmp_path / "run", "--max_steps", "2"))
    output = tmp_path / "run"
    assert not list(output.glob("checkpoint-*"))  # half-written files stayed under a staging name
    assert not (output / "config.json").exists()
    monkeypatch.undo()
    cli.main(args(tiny_dir, data, tmp_path / "run", "--max_steps", "2"))
    assert (output / "checkpoint-2" / "manager.safetensors").is_file()
    assert not [p for p in output.iterdir() if p.name.startswith(".partial")]


def test_bad_data_stops_before_the_first_step(tiny_dir, data, tmp_path, monkeypatch):
    records = json.loads((data / "mixed.json").read_text())
    records[3] = {**records[3], "image": "images/missing.png"}
    (tmp_path / "bad.json").write_text(json.dumps(records))
    monkeypatch.setattr(StageTrainer, "train", lambda *a, **k: pytest.fail("training started"))
    argv = args(tiny_dir, data, tmp_path / "out")
    argv[argv.index("--data_path") + 1] = str(tmp_path / "bad.json")
    with pytest.raises(
        BadDataError, match=rf"record '{records[3]['id']}' \(#3 in {tmp_path / 'bad.json'}\).*not found"
    ):
        cli.main(argv)
    monkeypatch.undo()
    result = cli.main([*argv, "--on_bad_data", "skip", "--max_steps", "1"])
    assert result.skipped_records == 1
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped_records.jsonl").read_text().splitlines()]
    assert len(skipped) == 1 and records[3]["id"] in skipped[0]["record"]
    (tmp_path / "mixture.yaml").write_text("datasets:\n  - json_path: bad.json\n    sampling_strategy: sometimes\n")
    argv[argv.index("--data_path") + 1] = str(tmp_path / "mixture.yaml")
    with pytest.raises(ValueError, match=r"mixture .*mixture.yaml, datasets\[0\]: sampling_strategy 'sometimes'"):
        cli.main(argv)
