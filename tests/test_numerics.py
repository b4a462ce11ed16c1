"""Numerics of the patched model (tiny, CPU): bf16 exactness of a zero manager, fp32 vs bf16, sdpa vs eager."""

from __future__ import annotations

import pytest
import torch
from test_llava_integration import make_inputs, randomise_managers, set_aspect
from transformers import LlavaOnevisionForConditionalGeneration

from llava_integration import apply_manager
from manager_plugin import ManagerConfig

SAMPLES = {"anyres_max_9": [[(100, 150)], [(40, 70), (64, 64)], []], "square": [[(100, 150)], [(30, 90)]]}
# fp32 vs bf16 (8 mantissa bits, ~3 significant digits) through 6 SigLIP + 6 Qwen2 layers: the patched model's logits
# may differ from its fp32 self by no more than this, relative to their largest magnitude (measured: 0.7-0.9%) ...
BF16_RELATIVE_TOLERANCE = 0.02
# ... nor by more than this multiple of the unpatched model's own fp32 vs bf16 difference (measured: 0.7-0.9x).
BF16_ERROR_GROWTH = 2.0


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    return None


def load(tiny_dir, dtype, attention="sdpa"):
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir, dtype=dtype, attn_implementation=attention)
    return model.eval()


def logits_of(model, inputs, **kwargs):
    inputs = {key: value.to(model.dtype) if torch.is_floating_point(value) else value for key, value in inputs.items()}
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.mark.parametrize("aspect", list(SAMPLES))
@pytest.mark.parametrize("manager_type", ["static", "adaptive_cross"])
def test_zero_manager_is_bit_identical_to_the_base_model_in_bf16(tiny_dir, tiny_processor, manager_type, aspect):
    model = load(tiny_dir, torch.bfloat16)
    set_aspect(model, aspect)
    inputs = make_inputs(tiny_processor, aspect, SAMPLES[aspect])
    base_logits = logits_of(model, inputs)
    with torch.no_grad():
        base_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    apply_manager(model, ManagerConfig(manager_type=manager_type))
    assert model.model.manager.layer_embedding.weight.dtype == torch.bfloat16
    assert torch.equal(logits_of(model, inputs), base_logits)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), base_tokens)


def patched(tiny_dir, dtype, aspect, attention="sdpa", manager_type="static"):
    model = load(tiny_dir, dtype, attention)
    set_aspect(model, aspect)
    apply_manager(model, ManagerConfig(manager_type=manager_type))
    randomise_managers(model)  # the same draws in every dtype: drawn in fp32, then cast
    return model


@pytest.mark.parametrize("aspect", list(SAMPLES))
def test_bf16_logits_stay_within_the_stated_tolerance_of_fp32(tiny_dir, tiny_processor, aspect):
    inputs = make_inputs(tiny_processor, aspect, SAMPLES[aspect])
    attended = inputs["attention_mask"].bool()
    full = logits_of(patched(tiny_dir, torch.float32, aspect), inputs)[attended]
    half = logits_of(patched(tiny_dir, torch.bfloat16, aspect), inputs)[attended].float()
    base_full = logits_of(set_aspect_of(load(tiny_dir, torch.float32), aspect), inputs)[attended]
    base_half = logits_of(set_aspect_of(load(tiny_dir, torch.bfloat16), aspect), inputs)[attended].float()
    error = (half - full).abs().max()
    assert error <= BF16_RELATIVE_TOLERANCE * full.abs().max()
    assert error <= BF16_ERROR_GROWTH * (base_half - base_full).abs().max()
    assert not torch.equal(half, full)  # bf16 did run in bf16


def set_aspect_of(model, aspect):
    set_aspect(model, aspect)
    return model


@pytest.mark.parametrize("aspect", list(SAMPLES))
@pytest.mark.parametrize("manager_type", ["static", "adaptive_cross"])
def test_sdpa_and_eager_attention_agree_in_fp32(tiny_dir, tiny_processor, manager_type, aspect):
    inputs = make_inputs(tiny_processor, aspect, SAMPLES[aspect])
    attended = inputs["attention_mask"].bool()
    sdpa = patched(tiny_dir, torch.float32, aspect, "sdpa", manager_type)
    eager = patched(tiny_dir, torch.float32, aspect, "eager", manager_type)
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    assert eager.config.text_config._attn_implementation == "eager"
    torch.testing.assert_close(
        logits_of(eager, inputs)[attended], logits_of(sdpa, inputs)[attended], rtol=1e-5, atol=1e-5
    )
