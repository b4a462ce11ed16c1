"""The ablation report (table, CSV, plot) from lmms-eval results files, and the manager-weights heatmap."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from eval.__main__ import main
from eval.benchmarks import load_table
from eval.manager_weights import read_manager, write_manager_weights
from llava_integration import apply_manager, manager_of, save_manager
from llava_manager.cli import main as llava_manager_main
from manager_plugin import LayerManagers, ManagerConfig

# Raw lmms-eval values per variant (fractions, as lmms-eval reports them; OCRBench: fraction of 1000 points).
RAW = {
    "baseline": {"vqav2_val": 0.70, "gqa": 0.55, "ocrbench": 0.450, "mathvista_testmini_format": 33.0},
    "manager": {"vqav2_val": 0.72, "gqa": 0.56, "ocrbench": 0.470, "mathvista_testmini_format": 35.0},
    "grid": {"vqav2_val": 0.74, "ocrbench": 0.540, "mathvista_testmini_format": 36.0},  # GQA missing
    "grid_manager": {"vqav2_val": 0.75, "gqa": 0.60, "ocrbench": 0.560, "mathvista_testmini_format": 38.0},
}
KEYS = {
    "vqav2_val": "exact_match,none",
    "gqa": "exact_match,none",
    "ocrbench": "ocrbench_accuracy,none",
    "mathvista_testmini_format": "llm_as_judge_eval,none",
}


def write_run(directory, values, stamp="20260101_000000", extra=None):
    """A results file as lmms-eval 0.7.3 writes it (the parts the report reads)."""
    results = {
        task: {"alias": task, KEYS[task]: value, KEYS[task].replace(",", "_stderr,"): 0.01}
        for task, value in values.items()
    }
    results.update(extra or {})
    data = {
        "results": results,
        "group_subtasks": {task: [] for task in results},
        "n-samples": {task: {"original": 10, "effective": 10} for task in results},
        "configs": {task: {"metric_list": [{"metric": KEYS.get(task, ",").split(",")[0]}]} for task in results},
    }
    path = directory / "model" / f"{stamp}_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return directory


def test_report_tables_our_numbers_beside_the_papers(tmp_path):
    runs = [f"{name}={write_run(tmp_path / name, values)}" for name, values in RAW.items()]
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 0

    lines = (tmp_path / "report" / "ablation.csv").read_text().splitlines()
    provenance = [line for line in lines if line.startswith("# ")]
    table = {row["task"]: row for row in csv.DictReader(line for line in lines if not line.startswith("#"))}
    assert provenance[0].startswith("# report: llava-manager ") and provenance == lines[: len(provenance)]
    assert "# evaluation of Baseline, +Manager, +Grid, +Grid+Manager: not recorded" in provenance[1]
    assert float(table["vqav2_val"]["manager"]) == pytest.approx(72.0)
    assert float(table["ocrbench"]["grid_manager"]) == pytest.approx(560.0)  # the paper's 0-1000 points
    assert float(table["mathvista_testmini_format"]["grid"]) == pytest.approx(36.0)
    assert table["gqa"]["grid"] == ""
    assert float(table["ocrbench"]["paper_grid_manager"]) == 577
    # The average covers the tasks every variant has, each out of 100 (OCRBench's points / 10).
    expected = {
        name: (values["vqav2_val"] * 100 + values["ocrbench"] * 100 + values["mathvista_testmini_format"]) / 3
        for name, values in RAW.items()
    }
    for name, value in expected.items():
        assert float(table["average"][name]) == pytest.approx(value)
    assert table["average"]["paper_baseline"] == ""  # the paper's average is over 20 tasks, ours over 3

    markdown = (tmp_path / "report" / "ablation.md").read_text()
    assert (
        "| VQAv2 | exact_match | 70.00 (73.90) | 72.00 (74.18) | +2.00 (+0.28) | 74.00 (74.65) | 75.00 (74.90) |"
        in markdown
    )
    assert (
        "| GQA | exact_match | 55.00 (57.66) | 56.00 (57.89) | +1.00 (+0.23) | — (57.95) | 60.00 (58.66) | — (+0.71) |"
        in markdown
    )
    assert "GQA (gqa): missing from the results of grid" in markdown
    assert "tasks of the paper's protocol in no results: MM-Vet, SEED, RealWorldQA," in markdown

    with Image.open(tmp_path / "report" / "ablation.png") as image:
        assert image.format == "PNG" and image.width >= 1200 and image.height >= 400
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # bars, markers and text, not a blank canvas


def test_report_says_what_is_missing(tmp_path, capsys):
    baseline = write_run(tmp_path / "baseline", RAW["baseline"])
    empty = write_run(tmp_path / "grid", {}, extra={"some_other_task": {"alias": "x"}})
    assert main(["report", f"baseline={baseline}", f"+Grid={empty}", "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert "note: variant +Manager (manager): no results given" in err
    assert "note: variant +Grid+Manager (grid_manager): no results given" in err
    assert "note: variant +Grid (grid): its results hold none of the reported tasks" in err
    assert "note: VQAv2 (vqav2_val): missing from the results of grid" in err

    # a mistake is an error line and exit status 2 (the command line's error boundary)
    assert (
        llava_manager_main(["eval", "report", f"baseline={tmp_path / 'nowhere'}", "--out", str(tmp_path / "r2")]) == 2
    )
    assert "error: no lmms-eval results at" in capsys.readouterr().err
    assert llava_manager_main(["eval", "report", f"gridmanager={baseline}", "--out", str(tmp_path / "r3")]) == 2
    assert "unknown variant 'gridmanager'" in capsys.readouterr().err


def test_report_reads_the_tiny_tasks_and_skips_predict_only_runs(tmp_path):
    from eval.report import build_report
    from eval.results import load_results

    run = tmp_path / "manager"
    scored = {"manager_tiny": {"exact_match,none": 0.25}, "manager_tiny_mc": {"acc,none": 0.5}}
    write_run(run, {}, stamp="20260101_000000", extra=scored)
    predicted = json.loads(next(run.rglob("*_results.json")).read_text())
    predicted["results"] = {"manager_tiny": {"bypass,none": 999}}
    predicted["config"] = {"resolved_cli_args": {"predict_only": True}}
    (run / "model" / "20260102_000000_results.json").write_text(json.dumps(predicted))
    report = build_report({"manager": load_results(run)}, load_table())
    rows = {row.task: row for row in report.rows}
    assert rows["manager_tiny"].ours["manager"] == pytest.approx(25.0)
    assert rows["manager_tiny_mc"].ours["manager"] == pytest.approx(50.0)
    assert report.average.ours["manager"] == pytest.approx(37.5)
    assert "no task of the paper's protocol in the results: paper numbers are not compared" in report.notes


def paper_shaped_managers(manager_type):
    config = ManagerConfig(
        vision_layers=list(range(13, 26)),
        injection_layers=[0, 4, 8, 12, 16, 20],
        hidden_size=896,
        manager_type=manager_type,
    )
    managers = LayerManagers(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in managers.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return config, managers


@pytest.mark.parametrize("manager_type", ["static", "adaptive_cross"])
def test_manager_weights_heatmap_shows_each_layers_share(tmp_path, manager_type):
    config, managers = paper_shaped_managers(manager_type)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {name: tensor.contiguous() for name, tensor in managers.state_dict().items()}, adapter / "manager.safetensors"
    )
    config.save(adapter)
    assert main(["manager-weights", str(adapter), "--out", str(tmp_path / "out")]) == 0

    rows = list(csv.reader((tmp_path / "out" / "manager_weights.csv").open()))
    assert rows[0] == ["decoder_layer", *(f"vision_{layer}" for layer in range(13, 26))]
    for slot, row in enumerate(rows[1:]):
        manager = managers.managers[slot]
        weight = manager.layer_weights if slot == 0 or manager_type == "static" else manager.gate
        magnitude = weight.abs().mean(dim=1)
        expected = (magnitude / magnitude.sum()).tolist()
        assert [float(value) for value in row[1 : 1 + len(expected)]] == pytest.approx(expected, abs=1e-6)
        assert row[1 + len(expected) :] == ([""] if slot == 0 else [])  # layer 0 skips the last vision layer
    with Image.open(tmp_path / "out" / "manager_weights.png") as image:
        assert image.format == "PNG" and image.width >= 900


def test_manager_weights_reads_merged_checkpoints_like_adapters(tiny_model, tmp_path):
    apply_manager(tiny_model, ManagerConfig())
    with torch.no_grad():
        for parameter in manager_of(tiny_model).parameters():
            parameter.uniform_(-1, 1)
    tiny_model.save_pretrained(tmp_path / "merged")
    save_manager(tiny_model, tmp_path / "adapter")
    merged_config, merged = read_manager(tmp_path / "merged")
    adapter_config, adapted = read_manager(tmp_path / "adapter")
    assert merged_config == adapter_config
    assert merged.keys() == adapted.keys() and all(torch.equal(merged[key], adapted[key]) for key in merged)
    assert write_manager_weights(tmp_path / "merged", tmp_path / "out")[0].is_file()

    plain = tmp_path / "plain"
    plain.mkdir()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    del config["manager_config"]
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="checkpoint without a manager"):
        read_manager(plain)


def test_manager_weights_show_real_magnitudes_and_say_when_untrained(tmp_path):
    config, managers = paper_shaped_managers("static")
    with torch.no_grad():
        for parameter in managers.parameters():
            parameter.mul_(2e-3)  # the size trained weights have
    for name, scale in (("trained", 1.0), ("untrained", 0.0)):
        adapter = tmp_path / name
        adapter.mkdir()
        state = {key: (tensor * scale).contiguous() for key, tensor in managers.state_dict().items()}
        save_file(state, adapter / "manager.safetensors")
        config.save(adapter)
        write_manager_weights(adapter, tmp_path / f"{name}-out")
    magnitudes = list(csv.reader((tmp_path / "trained-out" / "manager_weight_magnitudes.csv").open()))
    for slot, row in enumerate(magnitudes[1:]):
        weight = managers.managers[slot].layer_weights.abs().mean(dim=1).tolist()
        assert [float(value) for value in row[1 : 1 + len(weight)]] == pytest.approx(weight, rel=1e-5)
    assert 1e-4 < float(magnitudes[1][1]) < 1e-2  # as they are, not normalised
    untrained = list(csv.reader((tmp_path / "untrained-out" / "manager_weights.csv").open()))
    assert all(value == "" for row in untrained[1:] for value in row[1:])  # no shares of a row of zeros
    zeros = list(csv.reader((tmp_path / "untrained-out" / "manager_weight_magnitudes.csv").open()))
    assert {value for row in zeros[1:] for value in row[1:]} == {"0", ""}


def test_manager_weights_title_says_untrained(tmp_path, monkeypatch):
    import eval.manager_weights as module

    titles = []
    monkeypatch.setattr(module, "plot_heatmap", lambda config, magnitudes, path, title: titles.append(title) or path)
    config, managers = paper_shaped_managers("static")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {key: torch.zeros_like(tensor) for key, tensor in managers.state_dict().items()},
        adapter / "manager.safetensors",
    )
    config.save(adapter)
    write_manager_weights(adapter, tmp_path / "out")
    assert "is untrained: all its weights are 0" in titles[0]
