"""Provenance: what every artifact records about how it was made (project commit, Python, library versions, and for
evaluations each task's version, data and judge), checked against values read here independently."""

from __future__ import annotations

import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from eval.report import build_report, provenance_lines, write_csv, write_markdown
from eval.results import Results, add_provenance, task_provenance
from manager_plugin import provenance
from manager_plugin.provenance import describe_environment, environment_provenance, source_revision

REPO = Path(__file__).resolve().parents[1]


def git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True).stdout


def test_environment_names_the_project_commit_python_and_libraries():
    recorded = environment_provenance()
    assert recorded["project"]["name"] == "llava-manager"
    assert recorded["project"]["version"] == metadata.version("llava-manager")
    assert recorded["python"] == platform.python_version()
    for name in ("torch", "transformers", "deepspeed", "peft", "accelerate", "datasets", "lmms-eval"):
        assert recorded["libraries"][name] == metadata.version(name)
    if (REPO / ".git").exists():  # a checkout (CI's clean clone is one)
        assert recorded["project"]["git_commit"] == git(REPO, "rev-parse", "HEAD").strip()
        assert recorded["project"]["git_dirty"] == bool(git(REPO, "status", "--porcelain").strip())
    line = describe_environment(recorded)
    assert line.startswith(f"llava-manager {recorded['project']['version']} @ ") and "lmms-eval 0.7.3" in line
    recorded["libraries"]["torch"] = "changed"  # callers get their own copy
    assert environment_provenance()["libraries"]["torch"] == metadata.version("torch")


def test_source_revision_tells_clean_dirty_and_no_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "SOURCE_ROOT", tmp_path)
    assert source_revision() == {"git_commit": None, "git_dirty": None}  # not a git checkout at all
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    commit = git(tmp_path, "rev-parse", "HEAD").strip()
    assert source_revision() == {"git_commit": commit, "git_dirty": False}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert source_revision() == {"git_commit": commit, "git_dirty": True}
    nested = tmp_path / "vendored"  # a package copied inside someone else's repository is not that repository
    nested.mkdir()
    monkeypatch.setattr(provenance, "SOURCE_ROOT", nested)
    assert source_revision() == {"git_commit": None, "git_dirty": None}


JUDGED_RUN = {
    "results": {"mmvet": {"gpt_eval_score,none": 30.0}, "ok_vqa_val2014": {"exact_match,none": 0.5}},
    "versions": {"mmvet": 0.0, "ok_vqa_val2014": 1.0},
    "configs": {
        "mmvet": {"dataset_path": "lmms-lab/MMVet", "metadata": {"version": 0.0, "gpt_eval_model_name": "gpt-4o"}},
        "ok_vqa_val2014": {
            "dataset_path": "lmms-lab/OK-VQA",
            "dataset_name": "val2014",
            "dataset_kwargs": {"token": True, "revision": "abc123"},
            "metadata": {"version": 1.0},
        },
    },
}


def test_tasks_record_version_data_revision_and_judge(monkeypatch):
    assert task_provenance(JUDGED_RUN) == {
        "mmvet": {
            "version": 0.0,
            "dataset_path": "lmms-lab/MMVet",
            "dataset_name": None,
            "dataset_revision": None,
            "judge_model": "gpt-4o",
        },
        "ok_vqa_val2014": {
            "version": 1.0,
            "dataset_path": "lmms-lab/OK-VQA",
            "dataset_name": "val2014",
            "dataset_revision": "abc123",
            "judge_model": None,
        },
    }
    monkeypatch.setenv("MODEL_VERSION", "gpt-4o-2024-11-20")
    monkeypatch.delenv("API_TYPE", raising=False)
    recorded = add_provenance(JUDGED_RUN)["provenance"]
    assert recorded["judge_environment"] == {"MODEL_VERSION": "gpt-4o-2024-11-20"}
    assert recorded["project"] == environment_provenance()["project"] and "provenance" not in JUDGED_RUN


def test_report_prints_and_stores_the_provenance(tmp_path):
    generated = {  # a task that makes its own documents (manager_tiny): no dataset path
        "results": {**JUDGED_RUN["results"], "manager_tiny": {"exact_match,none": 0.4}},
        "versions": {**JUDGED_RUN["versions"], "manager_tiny": 2.0},
        "configs": {**JUDGED_RUN["configs"], "manager_tiny": {"dataset_kwargs": {"num_docs": 200}}},
    }
    results = {}
    for name in ("baseline", "manager"):
        results[name] = Results()
        results[name].add(add_provenance(generated), tmp_path / f"{name}.json")
    report = build_report(results)
    expected_environment = describe_environment(environment_provenance())
    assert report.provenance == provenance_lines(results, report.labels)
    assert report.provenance == [
        f"report: {expected_environment}",
        f"evaluation of Baseline, +Manager: {expected_environment}",
        "task manager_tiny: version 2.0, data made by the task itself (no dataset path)",
        "task mmvet: version 0.0, data lmms-lab/MMVet (default branch at download), judge gpt-4o",
        "task ok_vqa_val2014: version 1.0, data lmms-lab/OK-VQA/val2014 (abc123)",
    ]
    markdown = write_markdown(report, tmp_path / "ablation.md").read_text()
    assert markdown.endswith("## Provenance\n\n" + "\n".join(f"- {line}" for line in report.provenance) + "\n")
    lines = write_csv(report, tmp_path / "ablation.csv").read_text().splitlines()
    assert lines[: len(report.provenance)] == [f"# {line}" for line in report.provenance]
    assert lines[len(report.provenance)].startswith("task,label,metric,")


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.lock
def test_the_environment_is_exactly_the_lock():
    """`make` installs requirements/lock.txt and nothing else (besides this project); deselect with `-m "not lock"`
    when running the suite in an environment of your own."""
    lock = (REPO / "requirements" / "lock.txt").read_text().splitlines()
    locked = dict(line.split("==") for line in lock if line and not line.startswith("#"))
    installed = {distribution.metadata["Name"]: distribution.version for distribution in metadata.distributions()}
    assert {normalised(name): version for name, version in installed.items() if name != "llava-manager"} == {
        normalised(name): version for name, version in locked.items()
    }
    assert "requirements/lock.txt" in (REPO / "Makefile").read_text()
