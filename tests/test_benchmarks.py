"""The manager-cost benchmark: a seconds-long smoke run of its output format, and its FLOP model checked against
torch's own FLOP counter and the paper's parameter counts. The measured numbers live in benchmarks/results/."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import forward_flops, matmul_total, training_flops
from benchmarks.inputs import make_batch, training_labels, workload
from benchmarks.manager_cost import main
from benchmarks.measure import MANAGER_PAIRS, VARIANTS
from benchmarks.report import CPU_TWIN, TIMED
from benchmarks.sizes import SIZES, build_config, build_model, build_processor
from llava_integration import apply_manager, set_image_aspect_ratio
from llava_integration.patch import resolve_manager_config
from llava_manager.cli import UsageError
from manager_plugin import ManagerConfig

REPEATS = 2


def _check_spread(summary: dict, repeats: int) -> None:
    assert summary["min"] <= summary["median"] <= summary["max"]
    assert len(summary["values"]) == repeats and summary["min"] > 0


def test_smoke_run_writes_the_table_json_and_plot(tmp_path):
    argv = ["--size", "tiny", "--repeats", str(REPEATS), "--warmup", "0", "--decode-tokens", "2", "--threads", "1"]
    result = main([*argv, "--out", str(tmp_path), "--tag", "smoke"])

    assert json.loads((tmp_path / "smoke.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "smoke.md").read_text()
    assert all(f"| {variant.label} |" in table for variant in VARIANTS.values())
    assert "| manager / reference | train step | prefill | generate | generate with weights |" in table

    assert {"cpu", "device_name", "torch_threads"} <= set(result["machine"])
    assert result["provenance"]["libraries"]["torch"] == torch.__version__.split("+")[0]
    assert result["provenance"]["project"]["name"] == "llava-manager"
    assert result["machine"]["torch_threads"] == 1
    assert list(result["variants"]) == list(VARIANTS)
    for name, base in MANAGER_PAIRS.items():
        with_manager, without = result["variants"][name], result["variants"][base]
        assert with_manager["params"] == without["params"] + with_manager["manager_params"] > without["params"]
        assert with_manager["workload"] == without["workload"]
        assert set(result["floor"][name]) == {"train", "prefill"}
        assert all(floor > 1 for floor in result["floor"][name].values())
        assert set(result["ratios"][name]) == set(TIMED) | set(CPU_TWIN.values())
    assert (
        result["variants"]["grid"]["workload"]["visual_tokens"]
        > result["variants"]["baseline"]["workload"]["visual_tokens"]
    )

    for name in VARIANTS:
        measured = result["measurements"][name]
        for metric in [*TIMED, *CPU_TWIN.values()]:
            _check_spread(measured[metric], REPEATS)
        assert measured["train_peak_bytes"] > 0 and measured["prefill_peak_bytes"] > 0
        assert measured["generate_peak_bytes"] > 0 and measured["weight_bytes"] > 0
        assert measured["mfu_train"] is None  # no accelerator peak on CPU


# The image modes of each family: OneVision's two, and the one mode (None) of LLaVA-1.5, NeXT and NeXT-Video.
FAMILY_MODES = [
    ("llava_onevision", "square"),
    ("llava_onevision", "anyres_max_9"),
    ("llava", None),
    ("llava_next", None),
    ("llava_next_video", None),
]


@pytest.mark.parametrize(("family", "aspect"), FAMILY_MODES)
def test_analytic_flops_equal_torch_flop_counter(family, aspect):
    """With eager attention every counted FLOP is a matmul or the patch convolution, as the model assumes (CLIP's
    class token included)."""
    size = SIZES["tiny"]
    processor = build_processor(size, family)
    config = build_config(size, processor, family)
    base = build_model(config, "cpu", torch.float32, "eager")
    model = apply_manager(copy.deepcopy(base))
    if aspect is not None:
        set_image_aspect_ratio(model, aspect)
        set_image_aspect_ratio(base, aspect)
    batch = make_batch(processor, aspect, 2, size.default_image, size.default_text_tokens)
    work = workload(batch, config, aspect, base)
    manager = resolve_manager_config(config, ManagerConfig())

    for net, managed in ((base, None), (model, manager)):
        counter = FlopCounterMode(display=False)
        with counter:
            net.train()(**batch, labels=training_labels(batch, config)).loss.backward()
        analytic = training_flops(forward_flops(config, work, managed, logits_tokens=work.batch_size * work.seq_len))
        assert counter.get_total_flops() == matmul_total(analytic)


def test_05b_counts_on_the_meta_device_match_the_paper(tmp_path):
    result = main(["--size", "0.5b", "--device", "meta", "--out", str(tmp_path), "--tag", "meta"])
    params = {name: info["params"] for name, info in result["variants"].items()}
    # The paper's overhead table: 893.62M -> 893.70M.
    assert round(params["baseline"] / 1e6, 2) == 893.62 and round(params["manager"] / 1e6, 2) == 893.70
    assert params["manager"] - params["baseline"] == 6 * 13 * 896 - 896 + 13 * 896
    # The estimate of the floor without grid: about +2.8% of the forward.
    assert round(100 * (result["floor"]["manager"]["prefill"] - 1), 1) == 2.8
    assert "measurements" not in result and (tmp_path / "meta.md").exists()


# Visual tokens of the one 64x64 image of the tiny size (32 px crops of 8 px patches: a 4x4 grid of 16 tokens per crop,
# CLIP's class token dropped): LLaVA-1.5 one crop; NeXT the base view, then the 2x2 grid (64x64 fits it exactly, so
# nothing is unpadded) as 8 rows of 8 tokens, each row closed by a newline token.
TINY_VISUAL_TOKENS = {"llava": 16, "llava_next": 16 + 8 * (8 + 1), "llava_next_video": 16 + 8 * (8 + 1)}


@pytest.mark.parametrize("family", sorted(TINY_VISUAL_TOKENS))
def test_each_family_runs_the_benchmark_at_the_tiny_size(family, tmp_path):
    argv = ["--family", family, "--size", "tiny", "--repeats", "1", "--warmup", "0", "--decode-tokens", "2"]
    result = main([*argv, "--generate-tokens", "2", "--threads", "1", "--no-plot", "--out", str(tmp_path)])

    assert result["family"] == family and (tmp_path / f"tiny-cpu-{family}.md").exists()
    # LLaVA-1.5's images have no grid; NeXT's always have theirs.
    pair = {"manager": "baseline"} if family == "llava" else {"grid_manager": "grid"}
    assert list(result["variants"]) == [*pair.values(), *pair] and list(result["floor"]) == list(pair)
    for name, base in pair.items():
        with_manager, without = result["variants"][name], result["variants"][base]
        assert with_manager["params"] == without["params"] + with_manager["manager_params"] > without["params"]
        assert with_manager["workload"]["visual_tokens"] == TINY_VISUAL_TOKENS[family]
        assert all(floor > 1 for floor in result["floor"][name].values())
        assert set(result["ratios"][name]) == set(TIMED) | set(CPU_TWIN.values())
    for measured in result["measurements"].values():
        _check_spread(measured["train_step_s"], 1)
        assert measured["train_peak_bytes"] > 0 and measured["generate_peak_bytes"] > 0


def test_a_variant_the_family_cannot_run_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--variants grid: --family llava runs baseline, manager"):
        main(["--family", "llava", "--variants", "grid"])
    with pytest.raises(UsageError, match=r"--variants baseline: --family llava_next runs grid, grid_manager"):
        main(["--family", "llava_next", "--variants", "baseline", "grid"])


@pytest.mark.parametrize(
    ("command", "device", "message"),
    [
        ("benchmarks.manager_cost", "gpu", r"--device 'gpu': expected cpu, cuda, cuda:N or meta"),
        ("benchmarks.prefill", "gpu", r"--device 'gpu': expected cpu, cuda or cuda:N"),
        ("benchmarks.prefill", "meta", r"--device meta: expected cpu, cuda or cuda:N"),
        ("benchmarks.throughput", "meta", r"--device meta: expected cpu, cuda or cuda:N"),
    ],
)
def test_every_benchmark_refuses_a_device_it_cannot_run_on_in_one_line(command, device, message):
    import importlib

    with pytest.raises(UsageError, match=f"^{message}$"):
        importlib.import_module(command).parse_args(["--device", device])


def test_prefill_run_gives_per_round_ratios_against_the_floor(tmp_path):
    from benchmarks.prefill import main as prefill_main

    rounds = 3
    result = prefill_main(["--size", "tiny", "--rounds", str(rounds), "--warmup", "0", "--out", str(tmp_path)])

    assert json.loads((tmp_path / "tiny-prefill-cpu.json").read_text()) == json.loads(json.dumps(result))
    table = (tmp_path / "tiny-prefill-cpu.md").read_text()
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["load_average_after"] is not None
    for name, base in MANAGER_PAIRS.items():
        assert f"| {VARIANTS[name].label} / {VARIANTS[base].label} |" in table
        assert result["floor"][name] > 1
        for metric in ("prefill_s", "prefill_cpu_s"):
            ours, theirs = result["timings"][name][metric]["values"], result["timings"][base][metric]["values"]
            assert len(ours) == len(theirs) == rounds
            per_round = sorted(a / b for a, b in zip(ours, theirs))
            assert result["ratios"][name][metric]["median"] == pytest.approx(per_round[rounds // 2])
