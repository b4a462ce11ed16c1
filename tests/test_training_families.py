"""Fine-tuning a tiny LLaVA-1.5 and LLaVA-NeXT with a manager through `python -m training`, with the model's own
(`USER: ... ASSISTANT:`) chat template."""

from __future__ import annotations

import json

import pytest
import torch

from llava_integration import load_manager, load_model, manager_of
from llava_integration.tiny import write_tiny
from training.cli import main
from training.synthetic import write_synthetic

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_synthetic(directory, seed=1, num_scenes=8)
    mixed = json.loads((directory / "qa.json").read_text())[:3] + json.loads((directory / "multi.json").read_text())[:1]
    (directory / "fixed.json").write_text(json.dumps(mixed))
    return directory


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_a_manager_recipe_fine_tunes_llava_1_5_and_next_with_their_own_chat_template(family, data, tmp_path):
    base = write_tiny(tmp_path / "base", family=family)
    out = tmp_path / "out"
    main([
        "--recipe", "stage1.5_manager", "--model_name_or_path", str(base), "--data_path", str(data / "fixed.json"),
        "--image_folder", str(data), "--output_dir", str(out), "--global_batch_size", "2",
        "--per_device_train_batch_size", "2", "--max_steps", "2", "--warmup_steps", "0",
        "--gradient_checkpointing", "false", "--report_to", "none", "--disable_tqdm", "true",
        "--manager_modalities", "images",
    ])  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))

    trained = load_model(out)
    assert type(trained).__mro__[1].__name__ == {"llava": "LlavaForConditionalGeneration"}.get(
        family, "LlavaNextForConditionalGeneration"
    )
    managers = manager_of(trained)
    assert (managers.config.model_family, managers.config.modalities) == (family, "images")
    assert all(manager.layer_weights.abs().sum() > 0 for manager in managers.managers)  # it learnt from zero
    adapter = load_manager(load_model(base), out)  # the adapter written beside the merged checkpoint
    for name, tensor in manager_of(adapter).state_dict().items():
        assert torch.equal(tensor, managers.state_dict()[name]), name


def test_the_loss_is_on_the_assistant_turns_of_a_template_without_generation_blocks(tmp_path):
    from transformers import AutoProcessor

    from training.data.records import Record
    from training.data.templates import get_template

    processor = AutoProcessor.from_pretrained(write_tiny(tmp_path / "tiny", family="llava"))
    record = Record(
        id="a",
        images=("x.png",),
        turns=(("human", "<image>\nWhat colour is the shape?"), ("gpt", "red"), ("human", "And?"), ("gpt", "a circle")),
        source="test",
        index=0,
    )
    encoded = get_template("chat").encode(record, processor)
    assert encoded.text == (
        "USER: <image>\nWhat colour is the shape? ASSISTANT: red<|im_end|> USER: And? ASSISTANT: a circle<|im_end|> "
    )
    target = encoded.input_ids[encoded.target_mask]
    assert processor.tokenizer.decode(target) == " red<|im_end|> a circle<|im_end|>"
