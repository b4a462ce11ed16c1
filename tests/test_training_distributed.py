"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 ranks (torchrun, gloo, CPU) with a step where one rank holds only text-only
samples while the other holds an image: the runs finish (no ZeRO-3 hang) and match the single-process losses.
Plain SGD with large steps: the second step's loss then shows any error in the first step's averaged gradient, and
the comparison is not at the mercy of Adam's first step (the sign of near-zero gradients).

Run as a script, this file is the torchrun worker: it trains the same stage with ZeRO-2, then ZeRO-3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

RECIPE = "stage1.5_manager"  # AnyRes grids, a manager, every part trained
REPO = Path(__file__).resolve().parents[1]


def stage_args(tiny: str, data: str, output: str, *extra: str) -> list[str]:
    return [
        "--recipe", RECIPE, "--model_name_or_path", tiny, "--data_path", f"{data}/mixed.json",
        "--image_folder", data, "--output_dir", output, "--global_batch_size", "4",
        "--per_device_train_batch_size", "2", "--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.5",
        "--manager_lr", "5", "--warmup_steps", "0", "--manager_jitter", "0", "--gradient_checkpointing", "false",
        "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", *extra,
    ]  # fmt: skip


def worker(work: str, tiny: str, data: str) -> None:
    """One rank: ZeRO-2 then ZeRO-3, in the same process (the import and process-group start happen once)."""
    from accelerate.state import AcceleratorState

    from training.cli import main

    for stage in ("zero2", "zero3"):
        main(stage_args(tiny, data, f"{work}/{stage}", "--deepspeed", stage))
        AcceleratorState._reset_state()  # the next Trainer brings its own DeepSpeed plugin


if __name__ == "__main__":
    worker(*sys.argv[1:4])
    sys.exit(0)

import pytest
import torch
from transformers import AutoProcessor

from llava_integration import load_model
from training.cli import main
from training.data import ModalityLengthGroupedSampler, get_template, read_data, validate_data
from training.model_setup import configure_processor
from training.recipe import load_recipe
from training.synthetic import write_synthetic

pytestmark = pytest.mark.usefixtures("single_thread")  # the tiny model is fastest on one thread


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """5 image and 3 text-only records: the image samples fill one global batch of 4; the leftovers (1 image, 3
    text-only) form the last one, sorted longest first, so rank 0 gets [image, text] and rank 1 [text, text]."""
    directory = tmp_path_factory.mktemp("data")
    write_synthetic(directory, seed=3, num_scenes=9)
    records = json.loads((directory / "qa.json").read_text())[:5]
    records += [json.loads(line) for line in (directory / "text.jsonl").read_text().splitlines()[:3]]
    (directory / "mixed.json").write_text(json.dumps(records))
    return directory


def losses(output: Path) -> list[float]:
    state = json.loads((output / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_the_data_puts_only_text_on_one_rank_while_the_other_has_an_image(tiny_dir, data):
    """The precondition of the test below: without the collator's dummy image, ZeRO-3 fails at step 2 on this data
    (gloo reports a collective mismatch; NCCL would hang)."""
    recipe = load_recipe(RECIPE)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    configure_processor(processor, recipe, recipe.image_aspect_ratio)
    checked = validate_data(
        read_data(data / "mixed.json"),
        template=get_template(recipe.template),
        processor=processor,
        image_folder=data,
        image_aspect_ratio=recipe.image_aspect_ratio,
        max_length=recipe.model_max_length,
    )
    order = list(ModalityLengthGroupedSampler(checked.lengths, group_size=4, seed=42))  # TrainingArguments' seed
    has_image = [[checked.lengths[i] > 0 for i in order[start : start + 2]] for start in range(0, 8, 2)]
    step2_rank0, step2_rank1 = has_image[2], has_image[3]  # per-device batches of 2 alternate between the ranks
    assert any(step2_rank0) and not any(step2_rank1)


def test_zero2_and_zero3_on_two_ranks_match_one_process(tiny_dir, data, tmp_path):
    single = main(stage_args(str(tiny_dir), str(data), str(tmp_path / "single")))  # gradient accumulation 2
    assert len(single.losses) == 2 and single.losses[1] < single.losses[0] - 0.1  # big steps: step 2 shows step 1

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        __file__, str(tmp_path), str(tiny_dir), str(data),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    reference = load_model(tmp_path / "single").state_dict()
    for stage in ("zero2", "zero3"):
        assert losses(tmp_path / stage) == pytest.approx(single.losses, rel=1e-5), stage
        trained = load_model(tmp_path / stage).state_dict()
        assert set(trained) == set(reference)
        for key, tensor in reference.items():
            torch.testing.assert_close(trained[key], tensor, rtol=1e-4, atol=1e-6, msg=f"{stage}: {key}")
