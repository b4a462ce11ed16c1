"""Stage 0 (`llava_integration.assemble`) on a tiny SigLIP and a tiny Qwen2 saved to disk: the tower is SigLIP's first
L-1 blocks, text-only logits are Qwen2's, the processor counts the tokens the model consumes, stages 1 and 1.5 train
from the result, and each bad input is refused with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import random_image
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    LlavaOnevisionForConditionalGeneration,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionModel,
)

from llava_integration import prepare_inputs, set_image_aspect_ratio, tiny
from llava_integration.assemble import main
from llava_manager.cli import run_main
from training.cli import main as train_main
from training.synthetic import write_synthetic

pytestmark = pytest.mark.usefixtures("single_thread")

MEAN, STD = [0.4, 0.5, 0.6], [0.3, 0.4, 0.5]  # not SigLIP's defaults, so the test sees them carried over


@pytest.fixture(scope="module")
def unimodal(tmp_path_factory) -> dict[str, Path]:
    """A tiny SigLIP as a full SiglipModel (text + vision, pooling head, its own image processor), the tiny SigLIP vision
    model, the tiny Qwen2 (tied embeddings) and an untied copy of it."""
    root = tmp_path_factory.mktemp("unimodal")
    vision_dir, llm_dir = tiny.write_tiny_unimodal(root)
    torch.manual_seed(1)
    text = SiglipTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    full = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=tiny.siglip_config().to_dict()))
    full.save_pretrained(root / "siglip_full")
    SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD).save_pretrained(
        root / "siglip_full"
    )
    untied = Qwen2ForCausalLM.from_pretrained(llm_dir, tie_word_embeddings=False)
    torch.manual_seed(2)
    untied.lm_head.weight.data = torch.randn_like(untied.lm_head.weight)  # a head of its own, unlike the embeddings
    untied.save_pretrained(root / "qwen2_untied")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llm_dir / name, root / "qwen2_untied" / name)
    return {
        "siglip": vision_dir,
        "siglip_full": root / "siglip_full",
        "qwen2": llm_dir,
        "qwen2_untied": root / "qwen2_untied",
    }


@pytest.fixture(scope="module")
def assembled(unimodal, tmp_path_factory) -> Path:
    """The full SigLIP + the untied Qwen2, AnyRes over three grids, through the command line."""
    out = tmp_path_factory.mktemp("assembled") / "stage0"
    argv = ["--vision", str(unimodal["siglip_full"]), "--llm", str(unimodal["qwen2_untied"]), str(out)]
    assert main([*argv, "--grid", "1x1,1x2,2x1", "--image-aspect-ratio", "anyres_max_4"]) == 0
    return out


def load(directory: Path) -> LlavaOnevisionForConditionalGeneration:
    return LlavaOnevisionForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()


def test_the_tower_is_siglips_first_blocks_and_reads_its_second_to_last_hidden_state(unimodal, assembled):
    source = load_file(unimodal["siglip_full"] / "model.safetensors")
    vision = {k[len("vision_model.") :]: v for k, v in source.items() if k.startswith("vision_model.")}
    blocks = tiny.TOWER_BLOCKS + 1
    kept = {k: v for k, v in vision.items() if not k.startswith(("head.", f"encoder.layers.{blocks - 1}."))}
    assert len(kept) < len(vision)  # the last block and the head were there to drop
    model = load(assembled)
    tower = model.model.vision_tower.state_dict()
    assert sorted(tower) == sorted(kept)
    assert all(torch.equal(tower[name], kept[name]) for name in kept)
    assert model.config.vision_config.num_hidden_layers == blocks - 1 and not model.config.vision_config.vision_use_head

    # The features the projector reads are SiglipVisionModel's hidden state L-1 on the same pixels.
    original = SiglipVisionModel.from_pretrained(unimodal["siglip_full"], dtype=torch.float32).eval()
    pixels = torch.randn(2, 3, 32, 32)
    seen = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        set_image_aspect_ratio(model, "square")
        model.model.get_image_features(pixel_values=pixels[:, None], image_sizes=torch.tensor([[32, 32]] * 2))
        expected = original(pixels, output_hidden_states=True).hidden_states[blocks - 1]
    handle.remove()
    assert len(original.encoder.layers) == blocks
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("llm", ["qwen2", "qwen2_untied"])
def test_text_only_logits_equal_qwen2s_on_its_vocabulary(unimodal, assembled, tmp_path, llm):
    out = assembled if llm == "qwen2_untied" else tmp_path / "tied"
    if llm == "qwen2":
        assert main(["--vision", str(unimodal["siglip"]), "--llm", str(unimodal[llm]), str(out)]) == 0
    qwen = Qwen2ForCausalLM.from_pretrained(unimodal[llm], dtype=torch.float32).eval()
    model = load(out)
    vocabulary = qwen.config.vocab_size
    processor = AutoProcessor.from_pretrained(out)
    ids = processor.tokenizer(
        ["The image shows a red circle", "What colour is the shape?"], padding=True, return_tensors="pt"
    )
    assert int(ids["input_ids"].max()) < vocabulary  # only the original vocabulary's tokens
    with torch.no_grad():
        expected = qwen(**ids).logits
        logits = model(**ids).logits
    assert logits.shape[-1] == vocabulary + 2  # <image> and <video> grew the embeddings
    assert torch.equal(logits[..., :vocabulary], expected)
    head = model.lm_head.weight
    assert torch.equal(head[:vocabulary], qwen.lm_head.weight)
    assert (head.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == (llm == "qwen2")


def test_processor_and_config_as_stage_1_expects(unimodal, assembled):
    processor = AutoProcessor.from_pretrained(assembled)
    config = load(assembled).config
    tokenizer = processor.tokenizer
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    original = len(tiny.build_tokenizer(media_tokens=False))
    assert (image_id, video_id) == (original, original + 1) == (config.image_token_id, config.video_token_id)
    assert config.image_grid_pinpoints == [[32, 32], [32, 64], [64, 32]]
    assert processor.image_processor.image_grid_pinpoints == config.image_grid_pinpoints
    assert config.vision_aspect_ratio == processor.vision_aspect_ratio == "anyres_max_4"
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert list(processor.image_processor.image_mean) == MEAN and list(processor.image_processor.image_std) == STD
    assert processor.num_image_tokens == (32 // 8) ** 2
    made = json.loads((assembled / "provenance.json").read_text())
    assert made["project"]["name"] == "llava-manager" and made["stage0"]["llm"] == str(unimodal["qwen2_untied"])
    assert (made["stage0"]["vision_blocks"], made["stage0"]["tokens_after"]) == (7, original + 2)
    assert "<|im_start|>assistant" in processor.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )


@pytest.mark.parametrize("aspect", ["square", "anyres_max_4"])
def test_processor_gives_the_image_tokens_the_model_consumes(assembled, aspect):
    model = set_image_aspect_ratio(load(assembled), aspect)
    processor = AutoProcessor.from_pretrained(assembled)
    images = [[random_image(32, 32, 0)], [random_image(40, 70, 1)]]  # a square image and one for the 1x2 grid
    batch = prepare_inputs(processor, ["<image>Describe.", "<image>Describe."], images, aspect)
    tokens = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    if aspect == "square":
        assert tokens == [16, 16]  # (32 px / 8 px patches)^2 each, no newline
    else:  # base view (16) + the chosen grid's 4-patch rows, each with a newline: 1x1 for 32x32, 1x2 for 40x70
        assert tokens == [16 + 4 * (4 + 1), 16 + 4 * (8 + 1)]
    with torch.no_grad():
        logits = model(**batch).logits  # HF checks that features and image tokens agree
    assert torch.isfinite(logits).all()


def test_stage_1_and_1_5_train_from_the_assembled_model(assembled, tmp_path):
    write_synthetic(tmp_path / "data", seed=1, num_scenes=4)
    common = ["--global_batch_size", "2", "--per_device_train_batch_size", "2", "--max_steps", "1", "--warmup_steps", "0",
              "--gradient_checkpointing", "false", "--report_to", "none", "--disable_tqdm", "true",
              "--image_folder", str(tmp_path / "data")]  # fmt: skip
    model = assembled
    for recipe, data in (("stage1_manager", "stage1.yaml"), ("stage1.5_manager", "stage1.5.yaml")):
        out = tmp_path / recipe
        argv = ["--recipe", recipe, "--model_name_or_path", str(model), "--data_path", str(tmp_path / "data" / data)]
        result = train_main([*argv, "--output_dir", str(out), *common])
        assert all(torch.isfinite(torch.tensor(result.losses)))
        assert (out / "manager.safetensors").is_file()
        model = out


def _error(argv: list[str], capsys) -> str:
    """What the command prints on stderr, checking that it exits with status 2 (a user's mistake)."""
    assert run_main(main, argv, prog="llava-manager assemble") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1  # one line (the weights' loading bars may come before it)
    return errors[0]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "vision_is_qwen2",
            "--vision {qwen2} holds model_type 'qwen2': expected one of ['siglip', 'siglip_vision_model']",
        ),
        ("llm_is_siglip", "--llm {siglip} holds model_type 'siglip_vision_model': expected one of ['qwen2']"),
        ("llm_not_causal", "holds ['Qwen2ForSequenceClassification']: expected a Qwen2ForCausalLM"),
        ("no_tokenizer", "no tokenizer in {llm}: expected tokenizer.json or vocab.json + merges.txt"),
        ("out_exists", "destination {out} already exists and is not an empty directory"),
        ("processor_size", "resizes to 48x48, but the tower's input is 32x32"),
        ("bad_grid", "--grid '2x': expected ROWSxCOLS..ROWSxCOLS"),
        ("bad_aspect", "--image-aspect-ratio 'anyres': expected 'square' or 'anyres_max_<N>'"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(unimodal, tmp_path, capsys, case, message):
    vision, llm, out, extra = unimodal["siglip"], unimodal["qwen2"], tmp_path / "out", []
    if case == "vision_is_qwen2":
        vision = unimodal["qwen2"]
    elif case == "llm_is_siglip":
        llm = unimodal["siglip"]
    elif case in ("llm_not_causal", "no_tokenizer"):
        llm = tmp_path / "llm"
        shutil.copytree(unimodal["qwen2"], llm)
        if case == "no_tokenizer":
            (llm / "tokenizer.json").unlink()
        else:
            config = json.loads((llm / "config.json").read_text())
            (llm / "config.json").write_text(
                json.dumps({**config, "architectures": ["Qwen2ForSequenceClassification"]})
            )
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "processor_size":
        vision = tmp_path / "siglip"
        shutil.copytree(unimodal["siglip"], vision)
        SiglipImageProcessor(size={"height": 48, "width": 48}).save_pretrained(vision)
    elif case == "bad_grid":
        extra = ["--grid", "2x"]
    elif case == "bad_aspect":
        extra = ["--image-aspect-ratio", "anyres"]
    before = sorted(tmp_path.iterdir())
    error = _error(["--vision", str(vision), "--llm", str(llm), str(out), *extra], capsys)
    assert message.format(qwen2=unimodal["qwen2"], siglip=unimodal["siglip"], llm=llm, out=out) in error
    assert sorted(tmp_path.iterdir()) == before  # no output, no staging directory
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_stage0_script_writes_where_the_stage_1_scripts_look(tmp_path):
    """The scripts' plumbing, with `echo` as the Python that would run: stage0.sh's OUTPUT is stage 1's MODEL."""
    scripts = Path(__file__).resolve().parents[1] / "llava_manager" / "scripts"
    env = {"PATH": os.environ["PATH"], "PYTHON": "echo", "CHECKPOINTS": str(tmp_path), "VISION": "v", "LLM": "l"}

    def script(name: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
        command = ["bash", str(scripts / name), *args]
        return subprocess.run(command, env={**env, **extra_env}, capture_output=True, text=True, check=False)

    assert script("stage0.sh", "--grid", "1x2").stdout.split() == [
        "-m", "llava_integration.assemble", "--vision", "v", "--llm", "l", "--grid", "1x2", str(tmp_path / "stage0")
    ]  # fmt: skip
    words = script("stage1.sh", DATA="d").stdout.split()
    assert words[words.index("--model_name_or_path") + 1] == str(tmp_path / "stage0")
    missing = script("stage0.sh", LLM="")
    assert missing.returncode != 0 and "set LLM to a Qwen2 causal LM directory" in missing.stderr
