"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 ranks (torchrun, gloo, CPU) with a step where one rank holds only text-only
samples while the other holds an image: the runs finish (no ZeRO-3 hang) and match the single-process losses. LoRA
under ZeRO-3 on the same 2 ranks saves its merged weights, gathered from every rank. ManagerTower under ZeRO-2 on 2
ranks matches one process, the managers' training noise included; its retrieval head contrasts the global batch.
Plain SGD with large steps: the second step's loss then shows any error in the first step's averaged gradient, and
the comparison is not at the mercy of Adam's first step (the sign of near-zero gradients).

Run as a script, this file is the torchrun worker: it trains the same stage with ZeRO-2, ZeRO-3, then LoRA + ZeRO-3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from llava_manager.cli import close_process_group

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


LORA = ("--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0")


# ManagerTower recipes run on 2 ranks, with their synthetic images: 6 samples each (SNLI-VE 3 hypotheses per image,
# pre-training 2 captions per image).
MANAGERTOWER_RECIPES = {"snli_ve": 2, "pretrain": 3}


def managertower_args(recipe: str, output: str, *extra: str) -> list[str]:
    """A ManagerTower recipe on its synthetic data (6 samples, see MANAGERTOWER_RECIPES), all of them in each step's
    global batch, in order, no dropout, no random augmentation, SGD: the setting in which 2 ranks should match one
    process. The random draws left (managers' noise, MLM masks, false images, ITM labels) must match too."""
    from manager_plugin.managertower.tiny import TINY_TEXT, build_tokenizer

    text = {**TINY_TEXT, "vocab_size": len(build_tokenizer()), "max_position_embeddings": 66,
            "hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0}  # fmt: skip
    settings = {
        "synthetic.num_images": MANAGERTOWER_RECIPES[recipe], "training.per_device_train_batch_size": 3,
        "training.global_batch_size": 6,
        "training.optim": "sgd", "training.learning_rate": 0.1, "training.warmup_steps": 0,
        "training.train_sampling_strategy": "sequential",
        "data.train_transform": "square", "model.config.hidden_dropout_prob": 0,
        "model.config.attention_probs_dropout_prob": 0, "model.config.text_config": json.dumps(text),
    }  # fmt: skip
    sets = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    return ["--recipe", recipe, "--output-dir", output, "--synthetic", "--max-steps", "2", *sets, *extra]


def probe_inputs(processor) -> dict:
    """A fixed batch (an image sample and a text-only one) to compare models on."""
    from conftest import random_image

    from llava_integration import prepare_inputs

    texts = [f"{processor.image_token}\nWhat colour is the shape?", "Which letter comes after A?"]
    return prepare_inputs(processor, texts, [[random_image(40, 96, seed=1)], []], "anyres_max_9", padding=True)


def worker(work: str, tiny: str, data: str) -> None:
    """One rank: ZeRO-2, ZeRO-3, then LoRA under ZeRO-3, in the same process (imports and process group start once).

    After the LoRA run, every rank runs the trained in-memory model on a fixed batch (ZeRO-3 forwards are collective)
    and rank 0 keeps its logits, to compare with the merged model reloaded from disk.
    """
    import torch
    import torch.distributed as dist
    from accelerate.state import AcceleratorState
    from transformers import AutoProcessor

    import training.run
    from training.cli import main

    trainers = []

    class Kept(training.run.StageTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    training.run.StageTrainer = Kept
    for name, extra in (("zero2", ()), ("zero3", ()), ("zero3-lora", LORA)):
        main(stage_args(tiny, data, f"{work}/{name}", "--deepspeed", name.split("-")[0], *extra))
        AcceleratorState._reset_state()  # the next Trainer brings its own DeepSpeed plugin
    model = trainers[-1].model.eval()
    with torch.no_grad():
        logits = model(**probe_inputs(AutoProcessor.from_pretrained(f"{work}/zero3-lora"))).logits
    if dist.get_rank() == 0:
        torch.save(logits, f"{work}/zero3-lora-logits.pt")

    from training.managertower.cli import main as managertower_main

    for recipe in MANAGERTOWER_RECIPES:
        managertower_main(managertower_args(recipe, f"{work}/managertower-{recipe}-zero2", "--deepspeed", "zero2"))
        AcceleratorState._reset_state()
    retrieval_itc_on_rank(work)


RETRIEVAL_IDS = [0, 1, 1, 2, 0, 3]  # image 0 has a caption on each rank: positives across ranks


def retrieval_setup():
    """A tiny retrieval model (in training mode, no dropout) and a global batch of 6 samples, equal in every process."""
    import torch

    from manager_plugin.managertower import ManagerTowerForImageTextRetrieval, ManagerTowerModel
    from manager_plugin.managertower.tiny import TINY_TEXT, tiny_config

    torch.manual_seed(0)
    no_dropout = {"hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0}
    text = {**TINY_TEXT, "vocab_size": 100, "max_position_embeddings": 66, **no_dropout}
    base = ManagerTowerModel(tiny_config(100, text_config=text, **no_dropout))
    model = ManagerTowerForImageTextRetrieval.from_base_model(base).train()
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(3, 100, (6, 7), generator=generator),
        "attention_mask": torch.ones(6, 7, dtype=torch.long),
        "pixel_values": torch.randn(6, 3, 32, 32, generator=generator),
        "image_ids": torch.tensor(RETRIEVAL_IDS),
    }
    return model, batch


def retrieval_itc_on_rank(work: str) -> None:
    """One rank: the retrieval head's ITC loss and gradients on its half of the global batch, averaged over the ranks
    (as DeepSpeed and DDP average gradients); then the per-rank losses on an uneven split (4 + 2)."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    model, batch = retrieval_setup()
    loss = model(**{key: value[3 * rank : 3 * rank + 3] for key, value in batch.items()}).losses["itc"]
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    for tensor in [loss.detach(), *grads.values()]:
        dist.all_reduce(tensor)
        tensor /= 2
    uneven = {key: value[:4] if rank == 0 else value[4:] for key, value in batch.items()}
    with torch.no_grad():
        uneven_losses = [torch.zeros(()), torch.zeros(())]
        dist.all_gather(uneven_losses, model(**uneven).losses["itc"])
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads, "uneven": uneven_losses}, f"{work}/retrieval-itc.pt")


if __name__ == "__main__":
    worker(*sys.argv[1:4])
    close_process_group()  # as the commands do: a live gloo group can abort the process at exit
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


def run_on_two_ranks(script: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`script args` on 2 ranks under torchrun (gloo, one thread each, offline), importing this checkout's code."""
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
        script, *args,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


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

    done = run_on_two_ranks(__file__, [str(tmp_path), str(tiny_dir), str(data)], timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    reference = load_model(tmp_path / "single").state_dict()
    for stage in ("zero2", "zero3"):
        assert losses(tmp_path / stage) == pytest.approx(single.losses, rel=1e-5), stage
        trained = load_model(tmp_path / stage).state_dict()
        assert set(trained) == set(reference)
        for key, tensor in reference.items():
            torch.testing.assert_close(trained[key], tensor, rtol=1e-4, atol=1e-6, msg=f"{stage}: {key}")
    check_lora_under_zero3(Path(tiny_dir), tmp_path)
    check_managertower_matches_one_process(tmp_path)
    check_retrieval_itc_contrasts_the_global_batch(tmp_path)


def check_managertower_matches_one_process(work: Path) -> None:
    """ManagerTower under ZeRO-2 on 2 ranks x 3 samples matches one process with 2 accumulation steps of 3, for the
    SNLI-VE head (the managers' training noise) and pre-training (also MLM masks, false images, ITM labels): the
    losses of both steps and the saved weights.

    Before the draws were tied to the sample (data) and to the micro-batch (forward), rank 1 drew what one process
    draws for its first micro-batch: step 1 already differed (SNLI-VE loss 1.0993 vs 1.1034, pre-training 6.6932 vs
    6.6795). What is left is fp32 summation order (ZeRO-2 averages the micro-batches' gradients in its reduce-scatter
    buffers, one process accumulates them in `.grad`): equal losses and 1.5e-8 at most in the weights seen; the
    tolerances (1e-6) leave room for other BLAS builds.
    """
    from manager_plugin.managertower import ManagerTowerHeadModel
    from training.managertower.cli import main as managertower_main

    for recipe in MANAGERTOWER_RECIPES:
        single, zero2 = work / f"managertower-{recipe}-single", work / f"managertower-{recipe}-zero2"
        managertower_main(managertower_args(recipe, str(single)))
        expected = losses(single)
        assert len(expected) == 2 and abs(expected[1] - expected[0]) > 0.1, recipe  # the same 6 samples: it trained
        assert losses(zero2) == pytest.approx(expected, rel=1e-6, abs=0), recipe
        assert (zero2 / "eval_metrics.json").is_file()
        reference = ManagerTowerHeadModel.from_pretrained(single).state_dict()
        trained = ManagerTowerHeadModel.from_pretrained(zero2).state_dict()
        assert set(trained) == set(reference)
        for key, tensor in reference.items():
            torch.testing.assert_close(trained[key], tensor, rtol=0, atol=1e-6, msg=f"{recipe} zero2: {key}")


def itc_row_losses(model, batch: dict) -> torch.Tensor:
    """Each sample's ITC loss against the whole batch, computed here from the embeddings: soft targets over the
    captions of the same image, the image-to-text and text-to-image cross-entropies averaged."""
    tower = model.managertower
    text = model.text_embeddings(tower.encode_text(batch["input_ids"], batch["attention_mask"]))
    image = model.image_embeddings(tower.encode_image(batch["pixel_values"]))
    ids = batch["image_ids"]
    targets = (ids[:, None] == ids[None, :]).float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    i2t = -(targets * torch.log_softmax(image @ text.t() / model.itc_temperature, dim=1)).sum(dim=1)
    t2i = -(targets * torch.log_softmax(text @ image.t() / model.itc_temperature, dim=1)).sum(dim=1)
    return (i2t + t2i) / 2


def check_retrieval_itc_contrasts_the_global_batch(work: Path) -> None:
    """The retrieval head on 2 ranks x 3 samples gives the ITC loss and gradients of one process with all 6 (each rank
    contrasts with every rank's embeddings, gathered with gradients, as the reference), here recomputed from the
    embeddings; an uneven 4 + 2 split gives each rank the mean of its own rows' losses against all 6."""
    ranked = torch.load(work / "retrieval-itc.pt")
    model, batch = retrieval_setup()
    rows = itc_row_losses(model, batch)
    rows.mean().backward()
    torch.testing.assert_close(ranked["loss"], rows.mean().detach(), rtol=1e-5, atol=1e-6)
    named = dict(model.named_parameters())
    assert any("itc_text_head" in name for name in ranked["grads"])
    for name, gradient in ranked["grads"].items():
        torch.testing.assert_close(gradient, named[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    expected = torch.stack([rows[:4].mean(), rows[4:].mean()]).detach()
    torch.testing.assert_close(torch.stack(ranked["uneven"]), expected, rtol=1e-5, atol=1e-6)
    # One process alone contrasts its own batch only: rank 0's 3 samples then give another loss.
    with torch.no_grad():
        alone = model(**{key: value[:3] for key, value in batch.items()}).losses["itc"]
        assert not torch.allclose(alone, rows[:3].mean())


def check_lora_under_zero3(tiny_dir: Path, work: Path) -> None:
    """LoRA under ZeRO-3 on 2 ranks: the saved model holds the LoRA weights gathered from every rank and merged (equal
    to this process's own merge of the saved adapter into the starting weights), the manager and projector trained in
    full, and the merged model reloaded gives the in-memory model's logits."""
    from safetensors.torch import load_file

    output = work / "zero3-lora"
    adapter = load_file(output / "trainable.safetensors")
    saved = load_model(output).state_dict()
    start = load_model(tiny_dir).state_dict()
    prefix, scaling = "base_model.model.", 8 / 4  # lora_alpha / lora_r
    lora_a = {
        key.removeprefix(prefix).replace(".lora_A.default", ""): t for key, t in adapter.items() if "lora_A" in key
    }
    layers = {key.split(".layers.")[1].split(".")[0] for key in saved if ".language_model.layers." in key}
    assert len(lora_a) == 7 * len(layers)  # q, k, v, o, gate, up, down of every decoder layer
    for key, a in lora_a.items():
        b = adapter[prefix + key.replace(".weight", ".lora_B.default.weight")]
        assert a.numel() and b.numel() and b.abs().sum() > 0, key  # gathered, not ZeRO-3's empty partitions; trained
        torch.testing.assert_close(saved[key], start[key] + scaling * b @ a, rtol=0, atol=1e-6, msg=key)
    for key, tensor in saved.items():
        if prefix + key in adapter:  # manager, projector, vision tower: trained in full, saved as trained
            assert torch.equal(tensor, adapter[prefix + key]), key
        elif key not in lora_a:
            assert torch.equal(tensor, start[key]), key  # the language model's other weights stay frozen under LoRA
    assert any(not torch.equal(saved[key], start[key]) for key in saved if "multi_modal_projector" in key)

    processor = AutoProcessor.from_pretrained(output)
    with torch.no_grad():
        reloaded = load_model(output).eval()(**probe_inputs(processor)).logits
    torch.testing.assert_close(reloaded, torch.load(work / "zero3-lora-logits.pt"), rtol=1e-4, atol=1e-5)
