"""Gradient checkpointing is transparent to the manager: with managers at several injection layers of checkpointed
decoder layers, the loss and every gradient equal those of the same step without checkpointing, for static and
adaptive managers, with the training jitter on."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image
from transformers import LlavaOnevisionForConditionalGeneration

from llava_integration import QUERY_MASK_KWARG, apply_manager, manager_of, prepare_inputs
from manager_plugin import ManagerConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def batch(processor):
    """Two image samples of different grids and a text-only one, with labels on every real token."""
    texts, images = [], []
    for index, sizes in enumerate([[(40, 96)], [(64, 64)], []]):
        content = [{"type": "image"}] * len(sizes) + [{"type": "text", "text": "What colour is the shape?"}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images.append([random_image(h, w, seed=index) for h, w in sizes])
    inputs = prepare_inputs(processor, texts, images, "anyres_max_9", padding=True)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def counted(forward, calls: dict, kind: str):
    def wrapper(*args, **kwargs):
        calls[kind] += 1
        return forward(*args, **kwargs)

    return wrapper


def loss_and_gradients(tiny_dir, processor, manager_type: str, checkpointing: bool):
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    apply_manager(model, ManagerConfig(manager_type=manager_type, injection_layers=[0, 2, 3, 5], jitter=0.01))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero managers: a zero gate would leave the controllers without gradient
        for parameter in manager_of(model).parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    inputs = batch(processor)
    if manager_type == "adaptive_cross":
        inputs[QUERY_MASK_KWARG] = inputs["attention_mask"].bool()
    calls = {"manager": 0, "mlp": 0}  # counted in `forward` itself: checkpoint recomputes run no module hooks
    for kind, modules in (
        ("manager", manager_of(model).managers),
        ("mlp", [l.mlp for l in model.model.language_model.layers]),
    ):
        for module in modules:
            module.forward = counted(module.forward, calls, kind)
    torch.manual_seed(2)  # the same jitter noise in both runs; checkpointing replays the RNG state in its recompute
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}, calls


@pytest.mark.parametrize("manager_type", ["static", "adaptive", "adaptive_cross"])
def test_gradient_checkpointing_changes_neither_loss_nor_any_gradient(tiny_dir, tiny_processor, manager_type):
    loss, gradients, calls = loss_and_gradients(tiny_dir, tiny_processor, manager_type, checkpointing=False)
    checkpointed_loss, checkpointed, recomputed = loss_and_gradients(tiny_dir, tiny_processor, manager_type, True)
    # Checkpointing is on (each decoder layer ran again in backward); the managers run in the layers' forward
    # pre-hooks, which this transformers version keeps outside the checkpoint: once per step either way.
    assert calls == {"manager": 4, "mlp": 6} and recomputed == {"manager": 4, "mlp": 12}
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-6)
    assert checkpointed.keys() == gradients.keys()
    managers = [name for name in gradients if ".manager." in name]
    assert len(managers) >= 4 and all(gradients[name].abs().sum() > 0 for name in managers)  # every manager learns
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-6, atol=1e-6, msg=name)
