"""Checkpoint conversion LLaVA-NeXT <-> HF LLaVA-OneVision + manager adapter, on tiny synthetic checkpoints.

The source checkpoints are written here in the ORIGINAL layout of the authors' LLaVA-NeXT code: `llava_qwen(_manager)`
config fields, a 7-block SigLIP tower whose last block is deleted, `mm_projector.0/.2`, per-layer manager scores of
shape (1, N, 1, D), a tied lm_head left out of the file. The reference forward below recomputes the original model's
output from that state dict with plain torch ops (SigLIP, projector, feature splicing, manager sums), using HF's Qwen2
only for the decoder layers, and never calls this library.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llava_integration import QUERY_MASK_KWARG, load_model, manager_of, prepare_inputs, remove_manager
from llava_integration.conversion import ConversionError, convert_hf_to_llava_next, convert_llava_next_to_hf
from llava_integration.conversion.checkpoint_io import load_state_dict
from llava_integration.conversion.config_mapping import (
    image_mode_from_original,
    manager_config_from_original,
    original_manager_fields,
)
from llava_integration.conversion.to_hf import fit_vocabulary
from llava_integration.conversion.vision_tower import full_tower_config, tower_name_for, truncated_tower_config
from llava_integration.patch import resolve_manager_config
from llava_integration.tiny import CORPUS_WORDS
from manager_plugin import LayerManagers
from tiny_tokenizers import train_byte_level_bpe

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 7,  # the full tower; LLaVA-NeXT keeps 6 blocks
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
TEXT = {
    "vocab_size": 448,  # more rows than tokens, as Qwen2 checkpoints have
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 6,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
}
MANAGER = {  # vision states 3, 4, 5 of the truncated tower's 7 (0..6); decoder layers 0, 2, 4
    "mm_manager_grid_type": "all",
    "mm_manager_vision_select_layers_start": 3,
    "mm_manager_vision_select_layers_interval": 1,
    "mm_manager_vision_select_layers_end": 6,
    "mm_manager_injection_start": 0,
    "mm_manager_injection_interval": 2,
    "mm_manager_injection_end": 6,
    "mm_manager_residual": True,
}
TOWER = "model.vision_tower.vision_tower.vision_model."
IMAGE_TOKEN_INDEX = -200  # LLaVA-NeXT's placeholder id for an image inside input_ids
IM_START = "<|im_start|>"
QUESTION = "What colour is the shape?"
# LLaVA-NeXT's qwen_1_5 conversation with one image before the question.
QWEN_PROMPT = (
    f"{IM_START}system\nYou are a helpful assistant.<|im_end|>\n{IM_START}user\n<image>\n{QUESTION}<|im_end|>\n"
    f"{IM_START}assistant\n"
)
GRID_PINPOINTS = "(1x1),...,(6x6)"


# -- writing checkpoints in the original layout -------------------------------------------------------------------
def original_tokenizer():
    """A Qwen2 byte-level BPE tokenizer with Qwen's three special tokens and no <image> token, as Qwen2 ships."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    lines = CORPUS_WORDS.split() * 2 + CORPUS_WORDS.splitlines()
    vocab, merges = train_byte_level_bpe(lines, 400, ["<|endoftext|>"])
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_tokens([AddedToken(token, special=True) for token in (IM_START, "<|im_end|>")], special_tokens=True)
    return tokenizer


def original_config(tower_dir, manager_type: str | None, aspect: str) -> dict:
    model_type = "llava_qwen_manager" if manager_type else "llava_qwen"
    config = {
        "architectures": ["LlavaQwenManagerForCausalLM" if manager_type else "LlavaQwenForCausalLM"],
        "model_type": model_type,
        **TEXT,
        "torch_dtype": "float32",
        "mm_vision_tower": str(tower_dir),
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "use_mm_proj": True,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 4096,
    }
    if aspect == "square":
        config.update(image_aspect_ratio="square", mm_patch_merge_type="flat", image_grid_pinpoints=None)
    else:
        config.update(
            image_aspect_ratio=aspect, mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=GRID_PINPOINTS
        )
    if manager_type:
        config.update(MANAGER, mm_manager_type=manager_type, mm_manager_softmax_temperature=1.0)
        # LlavaMetaModel writes the resolved lists into the config it saves.
        config["mm_manager_select_layer_index_list"] = [3, 4, 5]
        config["mm_manager_index_list"] = [0, 2, 4]
    return config


def original_tensors(manager_type: str | None, newline: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under LLaVA-NeXT's names and shapes, manager weights non-zero (as after training)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1, offset=0.0):
        return torch.randn(shape, generator=generator) * scale + offset

    v, vi, p, d, di = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"], 64, 128
    tokens = (VISION["image_size"] // p) ** 2
    tensors = {
        TOWER + "embeddings.patch_embedding.weight": rand(v, 3, p, p),
        TOWER + "embeddings.patch_embedding.bias": rand(v),
        TOWER + "embeddings.position_embedding.weight": rand(tokens, v),
        TOWER + "post_layernorm.weight": rand(v, offset=1.0),
        TOWER + "post_layernorm.bias": rand(v),
    }
    for block in range(VISION["num_hidden_layers"]):
        prefix = f"{TOWER}encoder.layers.{block}."
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tensors[f"{prefix}self_attn.{projection}.weight"] = rand(v, v, scale=0.2)
            tensors[f"{prefix}self_attn.{projection}.bias"] = rand(v)
        for norm in ("layer_norm1", "layer_norm2"):
            tensors[f"{prefix}{norm}.weight"] = rand(v, offset=1.0)
            tensors[f"{prefix}{norm}.bias"] = rand(v)
        tensors.update(
            {
                f"{prefix}mlp.fc1.weight": rand(vi, v, scale=0.2),
                f"{prefix}mlp.fc1.bias": rand(vi),
                f"{prefix}mlp.fc2.weight": rand(v, vi, scale=0.2),
                f"{prefix}mlp.fc2.bias": rand(v),
            }
        )
    # SigLipVisionTower.load_model: `del vision_model.encoder.layers[-1:]`, and the head becomes an Identity.
    last = f"{TOWER}encoder.layers.{VISION['num_hidden_layers'] - 1}."
    tensors = {key: value for key, value in tensors.items() if not key.startswith(last)}

    tensors.update(
        {
            "model.mm_projector.0.weight": rand(d, v, scale=0.2),
            "model.mm_projector.0.bias": rand(d),
            "model.mm_projector.2.weight": rand(d, d, scale=0.2),
            "model.mm_projector.2.bias": rand(d),
            "model.embed_tokens.weight": rand(TEXT["vocab_size"], d, scale=0.5),
            "model.norm.weight": rand(d, offset=1.0),
        }
    )
    if newline:
        tensors["model.image_newline"] = rand(d, scale=0.5)
    for layer in range(TEXT["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        kv = d // TEXT["num_attention_heads"] * TEXT["num_key_value_heads"]
        tensors.update(
            {
                f"{prefix}self_attn.q_proj.weight": rand(d, d),
                f"{prefix}self_attn.q_proj.bias": rand(d),
                f"{prefix}self_attn.k_proj.weight": rand(kv, d),
                f"{prefix}self_attn.k_proj.bias": rand(kv),
                f"{prefix}self_attn.v_proj.weight": rand(kv, d),
                f"{prefix}self_attn.v_proj.bias": rand(kv),
                f"{prefix}self_attn.o_proj.weight": rand(d, d),
                f"{prefix}mlp.gate_proj.weight": rand(di, d),
                f"{prefix}mlp.up_proj.weight": rand(di, d),
                f"{prefix}mlp.down_proj.weight": rand(d, di),
                f"{prefix}input_layernorm.weight": rand(d, offset=1.0),
                f"{prefix}post_attention_layernorm.weight": rand(d, offset=1.0),
            }
        )
    if manager_type:
        layers = 3
        tensors["model.manager_layer_embedding"] = rand(layers, d, scale=0.5)
        for slot, layer in enumerate((0, 2, 4)):
            prefix = f"model.manager.{slot}."
            if layer == 0 or manager_type.startswith("static"):
                tensors[prefix + "layer_scores"] = rand(1, layers - (layer == 0), 1, d, scale=0.5)
                continue
            tensors[prefix + "zero_gate"] = rand(1, layers, 1, d, scale=0.5)
            # the query variants (last, average, cross) score [query read-out ; state]: 2D inputs
            tensors[prefix + "linear_controller.weight"] = rand(
                layers, d if manager_type == "adaptive_zerouni" else 2 * d
            )
            if "_cross" in manager_type:
                for projection in ("q_proj", "k_proj"):
                    tensors[f"{prefix}fusion_attention.{projection}.weight"] = rand(d, d)
                    tensors[f"{prefix}fusion_attention.{projection}.bias"] = rand(d)
    return tensors


def write_original(directory, tower_dir, manager_type="static_zerouni", aspect="square", tensors=None, config=None):
    """A LLaVA-NeXT checkpoint directory: config.json, model.safetensors, tokenizer files."""
    directory.mkdir(parents=True)
    config = config or original_config(tower_dir, manager_type, aspect)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if tensors is None:
        tensors = original_tensors(manager_type, newline=aspect != "square")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    original_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    """The full SigLIP tower's config, as the local directory mm_vision_tower names."""
    from transformers import SiglipVisionConfig

    directory = tmp_path_factory.mktemp("siglip-tiny")
    SiglipVisionConfig(**VISION).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tower_dir):
    """(source, destination) of a conversion, made once per (manager type, aspect ratio)."""
    cache = {}

    def get(manager_type: str | None, aspect: str = "square"):
        if (manager_type, aspect) not in cache:
            root = tmp_path_factory.mktemp(f"{manager_type}-{aspect}")
            source = write_original(root / "llava_next", tower_dir, manager_type, aspect)
            cache[manager_type, aspect] = source, convert_llava_next_to_hf(source, root / "hf")
        return cache[manager_type, aspect]

    return get


# -- the reference forward: the original model, computed from its state dict ---------------------------------------
def siglip_hidden_states(sd: dict, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Embeddings, then the output of every kept block, as LLaVA-NeXT's SigLipEncoder returns them."""
    width, heads, eps = VISION["hidden_size"], VISION["num_attention_heads"], VISION["layer_norm_eps"]
    x = F.conv2d(
        pixels,
        sd[TOWER + "embeddings.patch_embedding.weight"],
        sd[TOWER + "embeddings.patch_embedding.bias"],
        stride=VISION["patch_size"],
    )
    x = x.flatten(2).transpose(1, 2) + sd[TOWER + "embeddings.position_embedding.weight"]
    states = [x]
    blocks = len({key.split(".")[6] for key in sd if key.startswith(TOWER + "encoder.layers.")})
    for block in range(blocks):
        prefix = f"{TOWER}encoder.layers.{block}."

        def linear(h, name, prefix=prefix):
            return F.linear(h, sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"])

        def norm(h, name, prefix=prefix):
            return F.layer_norm(h, (width,), sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"], eps)

        batch, length, _ = x.shape
        h = norm(x, "layer_norm1")
        q, k, v = (linear(h, f"self_attn.{name}_proj").view(batch, length, heads, -1).transpose(1, 2) for name in "qkv")
        attention = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
        x = x + linear(attention.transpose(1, 2).reshape(batch, length, width), "self_attn.out_proj")
        x = x + linear(F.gelu(linear(norm(x, "layer_norm2"), "mlp.fc1"), approximate="tanh"), "mlp.fc2")
        states.append(x)
    return states


def project(sd: dict, features: torch.Tensor) -> torch.Tensor:
    """mlp2x_gelu: Linear, GELU, Linear."""
    hidden = F.gelu(F.linear(features, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"]))
    return F.linear(hidden, sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"])


def original_pixels(image) -> torch.Tensor:
    """LLaVA-NeXT's SigLipImageProcessor on one image: bicubic resize to the crop size, /255, mean = std = 0.5."""
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    first = ChannelDimension.FIRST
    size = (VISION["image_size"], VISION["image_size"])
    pixels = resize(
        np.asarray(image.convert("RGB")).transpose(2, 0, 1),
        size,
        resample=PILImageResampling.BICUBIC,
        data_format=first,
        input_data_format=first,
    )
    pixels = normalize(rescale(pixels, 1 / 255, input_data_format=first), [0.5] * 3, [0.5] * 3, input_data_format=first)
    return torch.from_numpy(pixels)


def manager_delta(sd, manager_type, slot, layer, experts, hidden, visual, query) -> torch.Tensor:
    """What LLaVA-NeXT's manager of `slot` adds to the visual tokens: `experts` (N, T, D), `hidden` (L, D)."""
    prefix = f"model.manager.{slot}."
    if layer == 0 or manager_type.startswith("static"):
        scores = sd[prefix + "layer_scores"][0]  # (n, 1, D)
        return (scores * (experts[:-1] if layer == 0 else experts)).sum(0)
    assert manager_type == "adaptive_cross_zerouni"
    state, extra = hidden[visual], hidden[query]
    q = F.linear(state, sd[prefix + "fusion_attention.q_proj.weight"], sd[prefix + "fusion_attention.q_proj.bias"])
    k = F.linear(extra, sd[prefix + "fusion_attention.k_proj.weight"], sd[prefix + "fusion_attention.k_proj.bias"])
    read = torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1) @ extra
    scores = F.linear(torch.cat([read, state], dim=-1), sd[prefix + "linear_controller.weight"])  # (T, N)
    return (scores.T[:, :, None] * sd[prefix + "zero_gate"][0] * experts).sum(0)


def original_query_positions(ids: list[int], im_start: int, image_tokens: int) -> list[int]:
    """The instruction tokens LLaVA-NeXT's adaptive managers read, by its own index arithmetic, after splicing."""
    second, third = [i for i, token in enumerate(ids) if token == im_start][1:3]
    image_at = ids.index(IMAGE_TOKEN_INDEX)
    end = third - 2 + image_tokens - 1  # the user turn's <|im_end|> after the image's tokens replace its placeholder
    before = list(range(second + 3, image_at))[:-1]  # text between "user\n" and the image, without its "\n"
    return before + list(range(image_at + image_tokens + 1, end))  # after the image's "\n", up to <|im_end|>


@torch.no_grad()
def reference_logits(source, ids: list[int], pixels: torch.Tensor, query: list[int]) -> torch.Tensor:
    """The original model's logits for `ids` (with one IMAGE_TOKEN_INDEX) and one square image."""
    config = json.loads((source / "config.json").read_text())
    sd = load_file(source / "model.safetensors")
    states = siglip_hidden_states(sd, pixels)
    image = project(sd, states[-1])[0]  # (T, D): hidden_states[-1] of the truncated tower

    llm = Qwen2ForCausalLM(Qwen2Config(**TEXT)).eval()
    text = {k: v for k, v in sd.items() if k.startswith(("model.layers.", "model.embed_tokens.", "model.norm."))}
    llm.load_state_dict({**text, "lm_head.weight": sd["model.embed_tokens.weight"]}, strict=True)
    at = ids.index(IMAGE_TOKEN_INDEX)
    embeds = llm.get_input_embeddings()(torch.tensor([t for t in ids if t != IMAGE_TOKEN_INDEX]))
    embeds = torch.cat([embeds[:at], image, embeds[at:]])[None]
    visual = slice(at, at + image.shape[0])

    handles = []
    manager_type = config.get("mm_manager_type")
    if manager_type:
        selected = range(
            config["mm_manager_vision_select_layers_start"],
            config["mm_manager_vision_select_layers_end"],
            config["mm_manager_vision_select_layers_interval"],
        )
        experts = (
            torch.stack([project(sd, states[i])[0] for i in selected]) + sd["model.manager_layer_embedding"][:, None]
        )
        injection = range(
            config["mm_manager_injection_start"],
            min(TEXT["num_hidden_layers"], config["mm_manager_injection_end"]),
            config["mm_manager_injection_interval"],
        )

        def inject(module, args, kwargs, slot, layer):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            hidden[0, visual] += manager_delta(sd, manager_type, slot, layer, experts, hidden[0], visual, query)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        for slot, layer in enumerate(injection):
            handles.append(
                llm.model.layers[layer].register_forward_pre_hook(
                    lambda m, a, k, slot=slot, layer=layer: inject(m, a, k, slot, layer), with_kwargs=True
                )
            )
    try:
        return llm(inputs_embeds=embeds).logits[0]
    finally:
        for handle in handles:
            handle.remove()


# -- tests ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("manager_type", [None, "static_zerouni", "adaptive_cross_zerouni"])
def test_converted_model_matches_the_original_forward(converted, manager_type):
    source, destination = converted(manager_type)
    model = load_model(destination, manager=destination if manager_type else None, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(destination)
    assert model.config.vision_aspect_ratio == "square"

    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == QWEN_PROMPT
    image = random_image(40, 56, seed=3)
    inputs = prepare_inputs(processor, [prompt], [[image]], "square")
    # The converted processor resizes like the original within 2 grey levels (PIL's resampler vs HF's).
    difference = (inputs["pixel_values"][0, 0] - original_pixels(image)).abs()
    assert difference.max() <= 2 * 2 / 255 + 1e-6 and difference.mean() < 1e-3

    # LLaVA-NeXT's tokenizer_image_token: the text around <image> tokenised apart, the image as one placeholder id.
    tokenizer = original_tokenizer()
    before, after = prompt.split("<image>")
    ids = tokenizer(before).input_ids + [IMAGE_TOKEN_INDEX] + tokenizer(after).input_ids
    hf_ids = inputs["input_ids"][0]
    image_mask = hf_ids == model.config.image_token_id
    tokens = (VISION["image_size"] // VISION["patch_size"]) ** 2
    assert int(image_mask.sum()) == tokens and int(image_mask.nonzero()[0]) == ids.index(IMAGE_TOKEN_INDEX)
    assert hf_ids[~image_mask].tolist() == [t for t in ids if t != IMAGE_TOKEN_INDEX]

    query = original_query_positions(ids, tokenizer.convert_tokens_to_ids(IM_START), tokens)
    assert tokenizer.decode(hf_ids[query]) == QUESTION
    query_mask = torch.zeros_like(image_mask)
    query_mask[query] = True
    with torch.no_grad():
        logits = model(**inputs, **{QUERY_MASK_KWARG: query_mask[None]}).logits[0]
    expected = reference_logits(source, ids, inputs["pixel_values"][:, 0], query)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)

    if manager_type:  # the converted manager is what makes the match: without it the outputs are far apart
        remove_manager(model)
        with torch.no_grad():
            plain = model(**inputs).logits[0]
        assert (plain - expected).abs().max() > 1e-2


@pytest.mark.parametrize(
    "manager_type, aspect",
    [
        (None, "square"),
        ("static_zerouni", "square"),
        ("adaptive_cross_zerouni", "square"),
        ("static_zerouni", "anyres_max_9"),
    ],
)
def test_round_trip_to_llava_next_is_lossless(converted, tower_dir, tmp_path, manager_type, aspect):
    source, destination = converted(manager_type, aspect)
    back = convert_hf_to_llava_next(destination, tmp_path / "back", vision_tower=str(tower_dir))

    original, restored = load_file(source / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(restored) == sorted(original)
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key

    config, restored_config = (
        json.loads((source / "config.json").read_text()),
        json.loads((back / "config.json").read_text()),
    )
    # HF's Qwen2Config drops sliding_window when use_sliding_window is false: it is unused then.
    assert restored_config["sliding_window"] is None and restored_config["use_sliding_window"] is False
    fields = [name for name in TEXT if name != "sliding_window"]
    fields += [
        "architectures",
        "model_type",
        "mm_vision_tower",
        "mm_projector_type",
        "mm_hidden_size",
        "mm_vision_select_layer",
        "mm_vision_select_feature",
        "image_aspect_ratio",
        "mm_patch_merge_type",
    ]
    if manager_type:
        fields += ["mm_manager_type", *MANAGER]
    assert {name: restored_config.get(name) for name in fields} == {name: config[name] for name in fields}
    if aspect == "square":
        assert restored_config["image_grid_pinpoints"] is None
    else:  # "(1x1),...,(6x6)" as LLaVA-NeXT expands it: (width, height) multiples of the crop size
        assert restored_config["image_grid_pinpoints"] == [[w * 32, h * 32] for w in range(1, 7) for h in range(1, 7)]

    tokenizer, restored_tokenizer = original_tokenizer(), AutoProcessor.from_pretrained(destination).tokenizer
    assert all(restored_tokenizer.convert_tokens_to_ids(t) == i for t, i in tokenizer.get_vocab().items())


def test_baseline_converts_to_a_plain_hf_model(converted):
    _, destination = converted(None)
    names = {path.name for path in destination.iterdir()}
    assert "manager_config.json" not in names and "manager.safetensors" not in names
    assert "manager_config" not in json.loads((destination / "config.json").read_text())
    assert not any("manager" in key for key in load_file(destination / "model.safetensors"))
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(destination)
    assert manager_of(model) is None and manager_of(load_model(destination)) is None


def test_manager_adapter_translates_the_config_field_by_field(converted):
    _, destination = converted("adaptive_cross_zerouni")
    adapter = json.loads((destination / "manager_config.json").read_text())
    assert adapter == {
        "vision_layers": [3, 4, 5],
        "injection_layers": [0, 2, 4],
        "manager_type": "adaptive_cross",
        "grid_type": "all",
        "jitter": 0.01,
        "hidden_size": 64,
        "modalities": "both",
        "model_family": "llava_onevision",
        "injection_interval": 4,
    }
    weights = load_file(destination / "manager.safetensors")
    assert weights["managers.0.layer_weights"].shape == (2, 64)  # layer 0: static, N - 1 layers
    assert weights["managers.1.gate"].shape == (3, 64) and weights["managers.1.controller.weight"].shape == (3, 128)


def test_grid_checkpoint_converts_loads_and_runs(converted):
    _, destination = converted("static_zerouni", "anyres_max_9")
    model = load_model(destination, manager=destination, dtype=torch.float32).eval()
    assert model.config.vision_aspect_ratio == "anyres_max_9"
    # (width, height) crops (1x1)..(6x6) of 32 px, swapped into HF's (height, width) in LLaVA-NeXT's order.
    assert model.config.image_grid_pinpoints == [[h * 32, w * 32] for w in range(1, 7) for h in range(1, 7)]
    assert manager_of(model).config.grid_type == "all"
    processor = AutoProcessor.from_pretrained(destination)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    inputs = prepare_inputs(processor, [prompt], [[random_image(50, 90, seed=1)]], "anyres_max_9")
    assert inputs["pixel_values"].shape[1] > 1  # base view + grid crops
    with torch.no_grad():
        logits = model(**inputs).logits
        remove_manager(model)
        plain = model(**inputs).logits
    assert torch.isfinite(logits).all() and (logits - plain).abs().max() > 1e-2


def test_plain_anyres_becomes_anyres_max_of_the_largest_grid():
    # Stage 1.5's pinpoints as (width, height); plain anyres never downsamples, nor does anyres_max_<most crops>.
    original = {
        "image_aspect_ratio": "anyres",
        "mm_patch_merge_type": "spatial_unpad",
        "image_grid_pinpoints": [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]],
    }
    assert image_mode_from_original(original, 384) == (
        "anyres_max_4",
        [[768, 384], [384, 768], [768, 768], [384, 1152], [1152, 384]],
    )


def test_released_manager_config_translates_to_the_papers_manager():
    """stage2_manager.sh's fields on SigLIP-so400m + Qwen2-0.5B: vision states 13..25, decoder layers 0, 4, .., 20."""
    fields = {
        "mm_manager_type": "static_zerouni",
        "mm_manager_grid_type": "all",
        "mm_manager_vision_select_layers_start": 13,
        "mm_manager_vision_select_layers_interval": 1,
        "mm_manager_vision_select_layers_end": 26,
        "mm_manager_injection_start": 0,
        "mm_manager_injection_interval": 4,
        "mm_manager_injection_end": 24,
        "mm_manager_residual": True,
    }
    original = {
        **fields,
        "image_aspect_ratio": "anyres_max_9",
        "mm_patch_merge_type": "spatial_unpad",
        "image_grid_pinpoints": GRID_PINPOINTS,
    }
    tower = truncated_tower_config(full_tower_config("~/model/siglip-so400m-patch14-384"), kept_blocks=26)
    assert tower_name_for(tower) == "google/siglip-so400m-patch14-384"
    aspect, pinpoints = image_mode_from_original(original, tower.image_size)
    assert aspect == "anyres_max_9" and len(pinpoints) == 36 and pinpoints[-1] == [2304, 2304]
    text = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
    config = LlavaOnevisionConfig(
        text_config=text, vision_config=tower, vision_aspect_ratio=aspect, image_grid_pinpoints=pinpoints
    )
    resolved = resolve_manager_config(config, manager_config_from_original(original, 24, square=False))
    assert resolved.vision_layers == list(range(13, 26)) and resolved.injection_layers == [0, 4, 8, 12, 16, 20]
    with torch.device("meta"):
        managers = LayerManagers(resolved)
    assert sum(parameter.numel() for parameter in managers.parameters()) == 68_992 + 11_648  # REFERENCE.md
    assert original_manager_fields(resolved) == fields


@pytest.mark.parametrize("tied", [True, False])
def test_media_tokens_that_do_not_fit_grow_the_embedding_by_its_mean(tied):
    embed, head = torch.randn(4, 8), torch.randn(4, 8)
    tensors = (
        {"model.embed_tokens.weight": embed} if tied else {"model.embed_tokens.weight": embed, "lm_head.weight": head}
    )
    grown = fit_vocabulary(tensors, num_tokens=6, tied=tied)
    assert torch.equal(grown["model.embed_tokens.weight"][:4], embed)
    torch.testing.assert_close(grown["model.embed_tokens.weight"][4:], embed.mean(0).expand(2, -1))
    if not tied:
        torch.testing.assert_close(grown["lm_head.weight"][4:], head.mean(0).expand(2, -1))
    assert fit_vocabulary(tensors, num_tokens=4, tied=tied) is tensors


def test_sharded_safetensors_and_bin_load_the_same_tensors(tmp_path):
    tensors = original_tensors("static_zerouni", newline=False)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for directory in ("sharded", "bin", "sharded_bin"):
        (tmp_path / directory).mkdir()
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, tmp_path / "sharded" / file)
        torch.save({n: tensors[n] for n in part}, tmp_path / "sharded_bin" / file.replace(".safetensors", ".bin"))
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    index["weight_map"] = {n: f.replace(".safetensors", ".bin") for n, f in index["weight_map"].items()}
    (tmp_path / "sharded_bin" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    for directory in ("sharded", "bin", "sharded_bin"):
        loaded = load_state_dict(tmp_path / directory)
        assert sorted(loaded) == names and all(torch.equal(loaded[n], tensors[n]) for n in names), directory


def test_bin_checkpoint_converts_like_safetensors(converted, tower_dir, tmp_path):
    source, destination = converted("static_zerouni")
    bin_source = write_original(tmp_path / "bin_source", tower_dir, tensors={})
    (bin_source / "model.safetensors").unlink()
    torch.save(load_file(source / "model.safetensors"), bin_source / "pytorch_model.bin")
    result = convert_llava_next_to_hf(bin_source, tmp_path / "hf")
    for name in ("model.safetensors", "manager.safetensors"):
        expected, got = load_file(destination / name), load_file(result / name)
        assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


class NeedsCode:
    """An object whose unpickling would import and run code from this module."""


def _corrupt(tensors: dict, config: dict, case: str) -> tuple[dict, dict]:
    if case == "unknown model type":
        config["model_type"] = "llava_llama"
    elif case == "unknown manager type":
        config["mm_manager_type"] = "static"
    elif case == "missing tensor":
        del tensors["model.layers.3.mlp.up_proj.weight"]
    elif case == "missing manager tensor":
        del tensors["model.manager.1.layer_scores"]
    elif case == "wrong shape":
        tensors["model.mm_projector.0.weight"] = torch.zeros(64, 16)
    elif case == "wrong manager shape":  # N layers at decoder layer 0, where the original keeps N - 1
        tensors["model.manager.0.layer_scores"] = torch.zeros(1, 3, 1, 64)
    return tensors, config


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown model type", r"unknown model type 'llava_llama'"),
        ("unknown manager type", r"unknown mm_manager_type 'static'"),
        ("missing tensor", r"missing tensor.*model\.layers\.3\.mlp\.up_proj\.weight"),
        ("missing manager tensor", r"missing manager tensor.*model\.manager\.1\.layer_scores"),
        ("wrong shape", r"model\.mm_projector\.0\.weight has shape \(64, 16\).*\(64, 32\)"),
        ("wrong manager shape", r"model\.manager\.0\.layer_scores has shape \(1, 3, 1, 64\).*\(1, 2, 1, 64\)"),
        ("pickle needing code", r"arbitrary code"),
        ("no tokenizer", r"no tokenizer in .*--tokenizer"),
    ],
)
def test_bad_checkpoints_fail_clearly_and_write_nothing(tower_dir, tmp_path, case, message):
    tensors, config = _corrupt(
        original_tensors("static_zerouni", newline=False), original_config(tower_dir, "static_zerouni", "square"), case
    )
    source = write_original(tmp_path / "source", tower_dir, tensors=tensors, config=config)
    if case == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (source / name).unlink()
    if case == "pickle needing code":
        (source / "model.safetensors").unlink()
        torch.save({**tensors, "extra": NeedsCode()}, source / "pytorch_model.bin")
    destination = tmp_path / "out" / "hf"
    with pytest.raises(ConversionError, match=message):
        convert_llava_next_to_hf(source, destination)
    assert not destination.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_occupied_destination_is_refused_untouched(converted, tmp_path):
    source, _ = converted("static_zerouni")
    destination = tmp_path / "hf"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert_llava_next_to_hf(source, destination)
    assert [path.name for path in destination.iterdir()] == ["keep.txt"]


def test_command_line_converts_both_ways(converted, tower_dir, tmp_path, capsys):
    from llava_integration.convert import main

    source, _ = converted("static_zerouni")
    main([str(source), str(tmp_path / "hf")])
    main(["--to-llava-next", str(tmp_path / "hf"), str(tmp_path / "back"), "--vision-tower", str(tower_dir)])
    assert load_file(tmp_path / "back" / "model.safetensors").keys() == load_file(source / "model.safetensors").keys()
    with pytest.raises(ConversionError, match="already exists"):
        main([str(source), str(tmp_path / "hf")])


def test_to_llava_next_refuses_a_tower_that_does_not_fit_and_writes_absolute_tower_paths(
    converted, tower_dir, tmp_path, monkeypatch
):
    from transformers import SiglipVisionConfig

    _, destination = converted("static_zerouni")
    wrong = tmp_path / "siglip-8-blocks"
    SiglipVisionConfig(**{**VISION, "num_hidden_layers": 8}).save_pretrained(wrong)  # the model keeps 6 of 7
    with pytest.raises(ConversionError, match=r"does not fit the model's tower: num_hidden_layers 8 \(model: 7\)"):
        convert_hf_to_llava_next(destination, tmp_path / "wrong", vision_tower=str(wrong))
    with pytest.raises(ConversionError, match=r"hidden_size 1152 \(model: 32\)"):  # the known tower, not this one
        convert_hf_to_llava_next(destination, tmp_path / "known", vision_tower="google/siglip-so400m-patch14-384")
    with pytest.raises(ConversionError, match="neither a local SigLIP directory nor a known tower"):
        convert_hf_to_llava_next(destination, tmp_path / "unknown", vision_tower="org/some-tower")
    assert not any(path.name in ("wrong", "known", "unknown") for path in tmp_path.iterdir())

    monkeypatch.chdir(tower_dir.parent)
    back = convert_hf_to_llava_next(destination, tmp_path / "back", vision_tower=tower_dir.name)  # relative
    written = json.loads((back / "config.json").read_text())["mm_vision_tower"]
    assert written == str(tower_dir.resolve())
    # ... which is what the reverse conversion reads the tower from, from any working directory
    monkeypatch.chdir(tmp_path)
    assert (convert_llava_next_to_hf(back, tmp_path / "again") / "config.json").is_file()
