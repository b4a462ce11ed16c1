"""The manager on the embedded tiny LLaVA-OneVision: patch, forward, generate, and report what the manager did.

`llava-manager demo [--model DIR]` (or `python -m llava_integration.demo`) uses the tiny default when no model is given; with a real
LLaVA-OneVision directory it runs the same steps on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .patch import apply_manager, manager_of
from .processing import prepare_inputs


def demo_image(width: int = 150, height: int = 100) -> Image.Image:
    """A red circle left of a blue square on white, wide enough to be cut into an AnyRes grid."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 20, 60, 70), fill="red")
    draw.rectangle((90, 30, 130, 70), fill="blue")
    return image


def _streams_entering_injection_layers(model, inputs, before_manager: bool) -> dict[int, torch.Tensor]:
    """The hidden states entering each injection layer, seen before or after the manager's pre-hook adds to them."""
    layers = model.model.language_model.layers
    seen: dict[int, torch.Tensor] = {}

    def record(index, module, args, kwargs):
        seen[index] = (args[0] if args else kwargs["hidden_states"]).detach()

    handles = [
        layers[index].register_forward_pre_hook(
            lambda module, args, kwargs, index=index: record(index, module, args, kwargs),
            with_kwargs=True,
            prepend=before_manager,
        )
        for index in manager_of(model).config.injection_layers
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def run(model_dir: str | None, seed: int = 0) -> None:
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        if model_dir is None:
            from .tiny import write_tiny

            model_dir = str(write_tiny(Path(scratch) / "tiny", seed=seed))
            print(f"built the tiny LLaVA-OneVision in {model_dir}")
        processor = AutoProcessor.from_pretrained(model_dir)
        processor.tokenizer.padding_side = "left"
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()

        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}
        ]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        image = demo_image()
        inputs = prepare_inputs(processor, [prompt], [[image]], model.config.vision_aspect_ratio)
        visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        print(
            f"image {image.size[0]}x{image.size[1]} -> {inputs['pixel_values'].shape[1]} crops, {visual} visual tokens"
        )

        with torch.no_grad():
            base_logits = model(**inputs).logits
        base_params = sum(p.numel() for p in model.parameters())
        apply_manager(model)
        managers = manager_of(model)
        added = sum(p.numel() for p in managers.parameters())
        print(f"applied {managers.config}")
        print(f"parameters {base_params:,} -> {base_params + added:,} (+{added:,})")
        with torch.no_grad():
            patched_logits = model(**inputs).logits
        print(f"zero-initialised manager: max |logit difference| = {(patched_logits - base_logits).abs().max():.3g}")

        # Stand in for training: give every manager weight a value, then see what the manager adds.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for manager in managers.managers:
                for parameter in manager.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        before = _streams_entering_injection_layers(model, inputs, before_manager=True)
        after = _streams_entering_injection_layers(model, inputs, before_manager=False)
        print("with non-zero manager weights, mean |added| per visual token entering each injection layer:")
        image_mask = inputs["input_ids"] == model.config.image_token_id
        before_image = torch.cumsum(image_mask.long(), dim=1) == 0
        for index in managers.config.injection_layers:
            change = after[index] - before[index]
            print(
                f"  decoder layer {index:2d}: {change[image_mask].norm(dim=-1).mean():.4f}"
                f"   (text before the image changed by {change[before_image].abs().max():.3g})"
            )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"greedy answer of the (random) tiny model: {answer!r}")


def main(argv: list[str] | None = None, prog: str = "python -m llava_integration.demo") -> None:
    """Parse the options, check the model exists, run the demo."""
    from llava_manager.models import check_model_reference

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a LLaVA-OneVision directory or hub id (default: the embedded tiny model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.model is not None:
        check_model_reference(args.model, "--model ")
    run(args.model, args.seed)


if __name__ == "__main__":
    from llava_manager.cli import run_main

    sys.exit(run_main(main, prog="python -m llava_integration.demo"))
