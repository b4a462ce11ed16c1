"""Checkpoints: a run killed after a checkpoint and resumed matches an unbroken run step for step; a checkpoint
is never left half-written; a finished stage is neither overwritten unasked nor left with its optimizer states; the
best checkpoint is recorded where it lands; bad data stops a run before any training step, and a record that fails to
decode during training is skipped or stops the run as --on_bad_data says; one process on several GPUs is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_image

from llava_integration import load_model
from training import cli
from training.arguments import resolve_stage
from training.data import BadDataError
from training.run import run_stage
from training.synthetic import write_synthetic
from training.trainer import BadRecordError, StageTrainer

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
    # A finished stage keeps its model, not its optimizer states: every checkpoint-N is gone.
    assert not list((tmp_path / "broken").glob("checkpoint-*")) and not list((tmp_path / "unbroken").glob("check*"))


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
    cli.main(args(tiny_dir, data, tmp_path / "run", "--max_steps", "2", "--keep_last_checkpoint", "true"))
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
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "mixture-run")
    with pytest.raises(ValueError, match=r"mixture .*mixture.yaml, datasets\[0\]: sampling_strategy 'sometimes'"):
        cli.main(argv)


def test_a_finished_stage_is_not_overwritten_unasked_and_keeps_no_checkpoint(tiny_dir, data, tmp_path):
    output = tmp_path / "run"
    cli.main(args(tiny_dir, data, output, "--max_steps", "2", "--keep_last_checkpoint", "true"))
    assert (output / "checkpoint-2").is_dir()  # kept when asked
    finished = (output / "config.json").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=f"--output_dir {output} holds a finished stage's model: pass --overw"):
        cli.main(args(tiny_dir, data, output, "--max_steps", "2"))
    assert (output / "config.json").stat().st_mtime_ns == finished

    cli.main(args(tiny_dir, data, output, "--max_steps", "2", "--overwrite_output_dir", "true"))
    assert (output / "config.json").stat().st_mtime_ns > finished and not list(output.glob("checkpoint-*"))
    with pytest.raises(FileExistsError, match=r"has finished and kept no checkpoint: nothing to resume"):
        cli.main(args(tiny_dir, data, output, "--max_steps", "2", "--resume_from_checkpoint", "true"))


def test_one_process_on_several_gpus_is_refused_before_anything_runs(tiny_dir, data, tmp_path):
    """HF Trainer would wrap the model in nn.DataParallel, whose replicas share the manager's forward state."""
    setup = resolve_stage(cli.parse_args(args(tiny_dir, data, tmp_path / "run")))
    setup.training._n_gpu = 2  # what TrainingArguments finds on a node with 2 GPUs and no launcher
    with pytest.raises(RuntimeError, match=r"one process sees 2 GPUs: .*torchrun --nproc_per_node 2 -m training"):
        run_stage(setup)
    assert not (tmp_path / "run").exists()


def test_a_record_that_fails_to_decode_in_training_is_skipped_or_stops(tiny_dir, data, tmp_path):
    """A truncated JPEG passes the default check (header + integrity) and fails only when a step decodes it."""
    records = json.loads((data / "mixed.json").read_text())
    random_image(40, 96, seed=5).save(tmp_path / "whole.jpg")
    raw = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    records[1] = {**records[1], "image": str(tmp_path / "cut.jpg")}
    (tmp_path / "bad.json").write_text(json.dumps(records))
    argv = args(tiny_dir, data, tmp_path / "skip", "--on_bad_data", "skip", "--save_steps", "1")
    argv[argv.index("--data_path") + 1] = str(tmp_path / "bad.json")

    skipped = cli.main(argv)
    assert skipped.global_step == STEPS and skipped.skipped_records == 1
    [entry] = [json.loads(line) for line in (tmp_path / "skip" / "skipped_records.jsonl").read_text().splitlines()]
    assert entry["record"] == f"record '{records[1]['id']}' (#1 in {tmp_path / 'bad.json'})"
    assert entry["reason"].startswith(f"image '{tmp_path / 'cut.jpg'}' at {tmp_path / 'cut.jpg'} cannot be decoded")

    argv[argv.index("--output_dir") + 1] = str(tmp_path / "stop")
    argv[argv.index("--on_bad_data") + 1] = "stop"
    with pytest.raises(BadRecordError) as stopped:
        cli.main(argv)
    message = str(stopped.value)
    checkpoint = tmp_path / "stop" / f"checkpoint-{entry['step']}"
    resume = f"rerun with --resume_from_checkpoint {checkpoint}"
    assert "\n" not in message and message.startswith(entry["record"] + ": " + entry["reason"])
    assert f"stopped at step {entry['step']} (--on_bad_data stop)" in message
    assert (resume if entry["step"] else "rerun (no checkpoint yet)") in message
    assert not (tmp_path / "stop" / "config.json").exists()


def test_the_best_checkpoint_is_recorded_where_it_lands(tmp_path):
    """Checkpoints are assembled under a staging name and renamed: HF records the best one under the staging name,
    which no longer exists when it reloads the best model at the end."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from training.optim import GroupRule

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    samples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (8, 6))]
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, save_total_limit=1,
        metric_for_best_model="loss", load_best_model_at_end=True, report_to="none", disable_tqdm=True,
        use_cpu=True,
    )  # fmt: skip
    trainer = StageTrainer(
        model=LlamaForCausalLM(config), args=training_args, train_dataset=samples, eval_dataset=samples[:4],
        group_rules=[GroupRule("all")],
    )  # fmt: skip
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == tmp_path / "run" and best.is_dir(), best
    recorded = json.loads((best / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert recorded == str(best)
