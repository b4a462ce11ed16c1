"""`python -m eval ablation`: the plan (recipes, order, chaining), skipping finished work on a re-run, and one end-to-end
run of every step on the tiny default with the smallest schedule."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from test_eval_tasks import shared_task_manager

from eval.ablation.launchers import InProcessLauncher
from eval.ablation.main import build_parser, build_steps, chance_notes, run, seed_layouts
from eval.ablation.plan import VARIANT_RECIPES, build_plan
from eval.ablation.schedule import load_schedule
from eval.ablation.scheduler import cpu_cores
from eval.ablation.steps import EvalStep, Stage0Step, StageStep, SyntheticDataStep, TinyUnimodalStep, TowerStep
from eval.benchmarks import load_table
from training.recipe import RECIPE_DIR

# The paper's four arms, each from stage 1 through stage 2 (REFERENCE.md section 1), written out by hand.
CHAINS = {
    "baseline": ["stage1", "stage1.5_nogrid", "stage2_nogrid"],
    "manager": ["stage1_manager", "stage1.5_manager_nogrid", "stage2_manager_nogrid"],
    "grid": ["stage1", "stage1.5", "stage2"],
    "grid_manager": ["stage1_manager", "stage1.5_manager", "stage2_manager"],
}


def test_plan_runs_each_recipe_once_after_the_recipe_it_starts_from():
    plan = build_plan()
    order = [run.recipe for run in plan.stages]
    assert sorted(order) == sorted({recipe for chain in CHAINS.values() for recipe in chain}) and len(order) == 10
    assert order[:2] == ["stage1", "stage1_manager"]  # stage by stage: the shared stage-1 runs first
    runs = {run.recipe: run for run in plan.stages}
    for variant, chain in CHAINS.items():
        assert [run.parent for run in (runs[recipe] for recipe in chain)] == [None, *chain[:-1]]
        assert all(variant in runs[recipe].variants for recipe in chain)
        assert all(order.index(parent) < order.index(child) for parent, child in itertools.pairwise(chain))
    # The parents agree with the recipe files themselves (read here as plain YAML).
    for stage in plan.stages:
        spec = yaml.safe_load((RECIPE_DIR / f"{stage.recipe}.yaml").read_text())
        assert spec["starts_from"] == stage.parent and spec["stage"] == stage.stage
    assert runs["stage1"].variants == ("baseline", "grid")
    assert runs["stage1_manager"].variants == ("manager", "grid_manager")
    # One evaluation per variant, of its last stage, with grids exactly where the report's table says.
    table = load_table()
    assert set(VARIANT_RECIPES) == set(table.variants)
    assert {e.variant: (e.recipe, e.grid) for e in plan.evaluations} == {
        variant: (chain[-1], table.variants[variant].grid) for variant, chain in CHAINS.items()
    }


def test_stage_arguments_chain_outputs_and_layer_the_options(tmp_path):
    args = build_parser().parse_args(
        ["--out", str(tmp_path), "--train-args", "--max_steps 7 --seed 3", "--model-args", "dtype=bfloat16"]
    )
    steps = build_steps(args, load_schedule("easy"), InProcessLauncher())
    stages = {step.run_spec.recipe: step for step in steps if isinstance(step, StageStep)}

    def option(step, name):
        values = [value for flag, value in zip(step.argv, step.argv[1:]) if flag == f"--{name}"]
        return values[-1]  # argparse keeps the last

    assert option(stages["stage1"], "model_name_or_path") == str(tmp_path / "seed_0" / "stage0")  # the tiny, assembled
    assert option(stages["stage2_manager"], "model_name_or_path") == str(
        tmp_path / "seed_0" / "stages" / "stage1.5_manager"
    )
    assert option(stages["stage1.5"], "data_path") == str(tmp_path / "seed_0" / "data" / "stage1.5.yaml")
    assert option(stages["stage2"], "output_dir") == str(tmp_path / "seed_0" / "stages" / "stage2")
    assert option(stages["stage2"], "max_steps") == "7"  # --train-args win over the schedule
    schedule = yaml.safe_load((Path(__file__).parents[1] / "eval" / "ablation" / "schedules" / "easy.yaml").read_text())
    assert float(option(stages["stage1.5"], "learning_rate")) == schedule["training"]["1.5"]["learning_rate"]
    evaluations = {step.run_spec.variant: step.job for step in steps if isinstance(step, EvalStep)}
    assert evaluations["grid"].model_args == "grid=true,dtype=bfloat16"  # the user's dtype replaces the schedule's
    assert evaluations["manager"].model_args == "grid=false,dtype=bfloat16"
    assert evaluations["manager"].checkpoint == tmp_path / "seed_0" / "stages" / "stage2_manager_nogrid"


def test_seeds_repeat_every_step_with_their_seed_under_their_own_directory(tmp_path, capsys):
    args = build_parser().parse_args(["--out", str(tmp_path), "--seeds", "2", "--seed", "5"])
    layouts = seed_layouts(args)
    assert {seed: layout.root for seed, layout in layouts.items()} == {5: tmp_path / "seed_5", 6: tmp_path / "seed_6"}
    steps = build_steps(args, load_schedule("detail"), InProcessLauncher(), layouts[6], 6)
    by_type = {type(step): step for step in steps}
    assert by_type[TinyUnimodalStep].seed == 6 and by_type[TowerStep].seed == 6
    assert by_type[TowerStep].directory == tmp_path / "seed_6" / "tower"
    assert by_type[Stage0Step].vision == tmp_path / "seed_6" / "tower"  # stage 0 assembles the pretrained tower
    assert by_type[Stage0Step].options == {"seed": 6} and by_type[SyntheticDataStep].options["seed"] == 6
    for step in (step for step in steps if isinstance(step, StageStep)):
        assert step.argv[step.argv.index("--seed") + 1] == "6"
        assert step.argv[step.argv.index("--output_dir") + 1].startswith(str(tmp_path / "seed_6"))
    assert {step.job.tasks for step in steps if isinstance(step, EvalStep)} == {
        ("manager_tiny_detail", "manager_tiny_detail_mc")
    }
    assert run(build_parser().parse_args(["--out", str(tmp_path), "--seeds", "0"])) == 2
    assert "--seeds must be at least 1, got 0" in capsys.readouterr().err


def test_the_default_schedule_is_the_detail_world(tmp_path, capsys, one_thread):
    """With no --schedule the tiny model runs the detail world: the tower is pretrained and probed before stage 0."""
    assert run(build_parser().parse_args(["--out", str(tmp_path), "--dry-run", "--threads", "1"])) == 0
    output = capsys.readouterr().out
    assert "| schedule detail (" in output and "pretrain the SigLIP (coarse + invariant to details)" in output
    assert f"| jobs {max(1, cpu_cores())}" in output  # the tiny model: one stage run per core by default
    assert "evaluate baseline (stage2_nogrid) on manager_tiny_detail,manager_tiny_detail_mc" in output


def test_the_easy_schedule_assembles_the_random_tower_and_evaluates_the_easy_tasks(tmp_path):
    """`easy` has no tower step: stage 0 assembles the random SigLIP; its tasks ask the easy scenes."""
    args = build_parser().parse_args(["--out", str(tmp_path)])
    steps = build_steps(args, load_schedule("easy"), InProcessLauncher())
    assert not any(isinstance(step, TowerStep) for step in steps)
    # Seed 0 trains with TrainingArguments' default seed, as the stages run by hand.
    assert {step.argv[step.argv.index("--seed") + 1] for step in steps if isinstance(step, StageStep)} == {"42"}
    unimodal, stage0 = steps[0], steps[1]
    assert isinstance(unimodal, TinyUnimodalStep) and isinstance(stage0, Stage0Step)
    assert stage0.vision == unimodal.vision
    evaluated = {step.job.tasks for step in steps if isinstance(step, EvalStep)}
    assert evaluated == {("manager_tiny", "manager_tiny_mc")}
    assert chance_notes(("manager_tiny", "manager_tiny_mc"), 6)[0].startswith("chance on the 6 manager_tiny documents")
    args = build_parser().parse_args(["--out", str(tmp_path), "--tasks", "manager_tiny_mc"])  # --tasks wins
    steps = build_steps(args, load_schedule("easy"), InProcessLauncher())
    assert {step.job.tasks for step in steps if isinstance(step, EvalStep)} == {("manager_tiny_mc",)}


@pytest.mark.parametrize("tasks", ["manager_tiny", [], ["manager_tiny,manager_tiny_mc"], [3]])
def test_a_schedule_names_its_tasks_as_a_list(tmp_path, tasks):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"description": "x", "tasks": tasks}))
    with pytest.raises(
        ValueError, match=re.escape(f"tasks must be a non-empty list of lmms-eval task names, got {tasks!r}")
    ):
        load_schedule(path)


def test_vision_and_llm_start_with_stage_0_instead_of_model(tmp_path, capsys, one_thread):
    """--vision/--llm: stage 0 assembles them into OUT/stage0, which stage 1 starts from; they pair, and exclude --model."""
    mixtures = {stage: tmp_path / f"{stage}.yaml" for stage in ("stage1", "stage1.5", "stage2")}
    for path in mixtures.values():
        path.write_text("datasets: []\n")
    data = ["--data", ",".join(f"{stage}={path}" for stage, path in mixtures.items()), "--image-folder", str(tmp_path)]
    unimodal = ["--vision", str(tmp_path / "siglip"), "--llm", str(tmp_path / "qwen2")]
    args = build_parser().parse_args(["--out", str(tmp_path / "out"), *unimodal, *data])
    steps = build_steps(args, load_schedule("full"), InProcessLauncher())
    assert isinstance(steps[0], Stage0Step) and not any(isinstance(step, TinyUnimodalStep) for step in steps)
    assert (steps[0].vision, steps[0].llm, steps[0].directory) == (
        tmp_path / "siglip", tmp_path / "qwen2", tmp_path / "out" / "seed_0" / "stage0"
    )  # fmt: skip
    stage1 = next(step for step in steps if isinstance(step, StageStep) and step.run_spec.recipe == "stage1")
    assert stage1.argv[stage1.argv.index("--model_name_or_path") + 1] == str(tmp_path / "out" / "seed_0" / "stage0")
    assert run(build_parser().parse_args(["--out", str(tmp_path / "out"), *unimodal, *data, "--dry-run"])) == 0
    dry_run = capsys.readouterr().out
    assert f"python -m llava_integration.assemble --vision {tmp_path / 'siglip'}" in dry_run
    assert "| jobs 1" in dry_run  # a real model's stage runs: one at a time unless --jobs says otherwise
    # Stage 0 runs first and stops the run on a bad input (here: no such directory), before any training.
    assert run(build_parser().parse_args(["--out", str(tmp_path / "out"), *unimodal, *data]), FakeLauncher()) == 1
    assert f"stage 0: --vision {tmp_path / 'siglip'} is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "out" / "seed_0" / "stage0").exists()
    for bad, message in (
        (unimodal[:2], "--vision and --llm go together"),
        ([*unimodal, "--model", str(tmp_path)], "--model replaces stage 0"),
    ):
        assert run(build_parser().parse_args(["--out", str(tmp_path / "bad"), *bad, *data])) == 2
        assert message in capsys.readouterr().err


@pytest.fixture
def one_thread(monkeypatch):
    """The ablation sets torch's threads and OMP_NUM_THREADS for its subprocesses: undo both after the test."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


class FakeLauncher:
    """Writes what a stage or an evaluation would leave, and notes what it was asked to run."""

    name = "fake"

    def __init__(self) -> None:
        self.trained: list[str] = []
        self.resumed: list[str] = []
        self.evaluated: list[str] = []

    def train_command(self, argv):
        return ["train", *argv]

    def eval_command(self, job):
        return ["eval", job.name]

    def train(self, argv):
        output = Path(argv[argv.index("--output_dir") + 1])
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text("{}")
        self.trained.append(argv[argv.index("--recipe") + 1])
        if "--resume_from_checkpoint" in argv:
            self.resumed.append(self.trained[-1])

    def evaluate(self, job):
        job.output_dir.mkdir(parents=True, exist_ok=True)
        results = {"results": {"manager_tiny": {"exact_match,none": 0.5}, "manager_tiny_mc": {"acc,none": 0.25}}}
        (job.output_dir / "results.json").write_text(json.dumps(results))
        self.evaluated.append(job.name)
        return job.output_dir / "results.json"


def test_a_rerun_skips_finished_work_and_redoes_what_is_stale(tmp_path, capsys, one_thread):
    base = ["--out", str(tmp_path), "--data", str(tmp_path / "data"), "--model", str(tmp_path / "base")]
    (tmp_path / "data").mkdir()
    (tmp_path / "base").mkdir()  # --model must exist
    for name in ("stage1.yaml", "stage1.5.yaml", "stage2.yaml"):
        (tmp_path / "data" / name).write_text("datasets: []\n")

    def ablation(*extra):
        launcher = FakeLauncher()
        code = run(build_parser().parse_args([*base, *extra]), launcher)
        return code, launcher

    code, first = ablation()
    assert code == 0 and len(first.trained) == 10 and len(first.evaluated) == 4
    assert sorted(first.trained) == sorted(stage.recipe for stage in build_plan().stages)

    code, again = ablation()
    assert code == 0 and again.trained == [] and again.evaluated == []
    assert "train stage2 (grid): skipped, model in" in capsys.readouterr().out

    # An interrupted stage (checkpoints, no config.json) resumes; everything made from it is redone from scratch.
    os.remove(tmp_path / "seed_0" / "stages" / "stage1.5" / "config.json")
    (tmp_path / "seed_0" / "stages" / "stage1.5" / "checkpoint-3").mkdir()
    (tmp_path / "seed_0" / "stages" / "stage2" / "checkpoint-3").mkdir()
    code, partial = ablation()
    assert code == 0 and partial.trained == ["stage1.5", "stage2"] and partial.evaluated == ["grid"]
    assert partial.resumed == ["stage1.5"] and not (tmp_path / "seed_0" / "stages" / "stage2" / "checkpoint-3").exists()

    code, changed = ablation("--train-args", "--max_steps 5")
    assert code == 1 and changed.trained == []
    assert "stage stage1 in" in capsys.readouterr().err

    code, forced = ablation("--train-args", "--max_steps 5", "--force")
    assert code == 0 and len(forced.trained) == 10 and len(forced.evaluated) == 4


def uncommented(handle):
    """The CSV's lines without its leading `# ` provenance lines."""
    return (line for line in handle if not line.startswith("#"))


def answers(results: dict) -> dict[str, list]:
    """Each task's generated answers (or choice scores), document by document, from a results file's samples."""
    return {
        task: [sample["filtered_resps"] for sample in sorted(samples, key=lambda sample: sample["doc_id"])]
        for task, samples in results["samples"].items()
    }


def test_tiny_ablation_end_to_end_with_the_smoke_schedule(tmp_path, capsys, one_thread):
    """Every step for real (in-process, 2 training steps per stage, 6 documents per task): all artifacts, a report
    naming all four variants, and a re-run that has nothing left to do. A second run into another directory, with its
    stage runs side by side in worker processes, gives the same scores, answers and report: the results are a function
    of the code and the seed alone."""
    launcher = InProcessLauncher(task_manager=shared_task_manager())  # the session's index (built once, 10-20 s)
    first, second = tmp_path / "first", tmp_path / "second"
    args = build_parser().parse_args(["--out", str(first), "--schedule", "smoke", "--threads", "1", "--jobs", "1"])
    assert run(args, launcher) == 0
    output = capsys.readouterr().out
    top, first = first, first / "seed_0"  # one seed's run under --out/seed_0, the report per kind under --out/report
    for stage in build_plan().stages:
        assert (first / "stages" / stage.recipe / "config.json").is_file(), stage.recipe
        provenance = json.loads((first / "stages" / stage.recipe / "provenance.json").read_text())
        assert provenance["stage"]["recipe"] == stage.recipe and provenance["global_step"] == 2
    for variant in VARIANT_RECIPES:
        results = json.loads((first / "eval" / variant / "results.json").read_text())
        assert results["n-samples"]["manager_tiny_detail_mc"]["effective"] == 6
        assert 0 <= results["results"]["manager_tiny_detail"]["exact_match,none"] <= 1
        assert results["provenance"]["tasks"]["manager_tiny_detail"]["version"] == 1.0
        assert {task: len(resps) for task, resps in answers(results).items()} == {
            "manager_tiny_detail": 6,
            "manager_tiny_detail_mc": 6,
        }
    report = first / "report"
    labels = [variant.label for variant in load_table().variants.values()]
    header = (report / "ablation.md").read_text().split("| Task |")[1].splitlines()[0]
    assert all(f" {label} " in header for label in labels)
    with (report / "ablation.csv").open() as handle:
        rows = {row["task"]: row for row in csv.DictReader(uncommented(handle))}
    assert all(rows["manager_tiny_detail_mc"][variant] != "" for variant in VARIANT_RECIPES)
    assert (report / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (report / "ablation.md").read_text()
    assert "[20/20" in output and "chance on the 6 manager_tiny_detail documents" in markdown
    assert "standard error of up to 20.4 points: a Δ within ±57.7 is noise" in markdown  # 50 / sqrt(6), x 2 sqrt(2)
    assert (
        "## Provenance" in output
        and "- evaluation of Baseline, +Manager, +Grid, +Grid+Manager: llava-manager" in output
    )

    by_kind = (top / "report" / "question_types.md").read_text()
    assert "**Hypothesis** (stated before running)" in by_kind and "| 6 (last, what LLaVA reads) |" in by_kind
    assert (
        "- gate: the layer LLaVA reads (hidden state 6)" in by_kind and "One seed cannot show significance" in by_kind
    )
    assert "one seed cannot show significance" in output and "--seeds 3" in output
    assert json.loads((first / "tower" / "probes.json").read_text())["probes"]["majority"].keys() == {
        "colour", "shape", "marker_colour", "marker_position", "letter"
    }  # fmt: skip

    launcher.train = launcher.evaluate = pytest.fail  # nothing may run again
    assert run(args, launcher) == 0
    assert capsys.readouterr().out.count("skipped") == 18

    launcher = InProcessLauncher(task_manager=shared_task_manager())
    launcher.train = pytest.fail  # side by side: every stage run trains in a worker process of its own
    side_by_side = ["--out", str(second), "--schedule", "smoke", "--threads", "1", "--jobs", "2"]
    assert run(build_parser().parse_args(side_by_side), launcher) == 0
    output = capsys.readouterr().out
    assert "| jobs 2" in output and f"[log: {second / 'seed_0' / 'logs' / 'stage2.log'}]" in output
    assert "stage stage2 finished at step 2" in (second / "seed_0" / "logs" / "stage2.log").read_text()
    # Stage 1.5 starts from stage 1's model: it starts only after stage 1's run has ended.
    lines = output.splitlines()
    ended = next(i for i, line in enumerate(lines) if "train stage1_manager (manager, grid_manager): done" in line)
    started = next(i for i, line in enumerate(lines) if "train stage1.5_manager (grid_manager) [log:" in line)
    assert ended < started
    for variant in VARIANT_RECIPES:
        once, again = (
            json.loads((out / "eval" / variant / "results.json").read_text()) for out in (first, second / "seed_0")
        )
        assert once["results"] == again["results"], variant
        assert answers(once) == answers(again), variant
    assert (second / "seed_0" / "report" / "ablation.md").read_text() == markdown
    assert (second / "report" / "question_types.md").read_text() == by_kind


def test_side_by_side_stops_at_a_failed_stage_run_and_shows_its_log(tmp_path, capsys, one_thread):
    """A stage run that fails in its worker ends the ablation with exit code 1 and the end of its log; nothing that
    starts from it runs, and its siblings' runs are stopped."""
    base = tmp_path / "base"
    base.mkdir()  # exists, but holds no model: each training fails as it loads it
    data = tmp_path / "data"
    data.mkdir()
    for name in ("stage1.yaml", "stage1.5.yaml", "stage2.yaml"):
        (data / name).write_text("datasets: []\n")
    argv = ["--out", str(tmp_path / "out"), "--model", str(base), "--data", str(data), "--jobs", "2", "--threads", "1"]
    assert run(build_parser().parse_args(argv), InProcessLauncher(task_manager=object())) == 1
    captured = capsys.readouterr()
    assert re.search(r"train stage1 \(baseline, grid\): FAILED after", captured.out)
    assert re.search(r"train stage1_manager \(manager, grid_manager\): FAILED after", captured.out)
    assert "train stage1.5" not in captured.out
    failed = re.search(r"error: stage (\S+) exited with code 1; the end of its log (\S+):", captured.err)
    log = tmp_path / "out" / "seed_0" / "logs" / f"{failed[1]}.log"  # whichever of the two stage-1 runs ended first
    assert failed[2] == str(log) and log.read_text().strip().splitlines()[-1] in captured.err
    assert not (tmp_path / "out" / "seed_0" / "stages" / "stage1" / "config.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--jobs", "0"], "--jobs 0: expected a positive number"),
        (["--jobs", "2", "--launcher", "subprocess"], "--jobs 2 needs --launcher inprocess"),
    ],
)
def test_jobs_are_checked_in_one_line(tmp_path, capsys, one_thread, extra, message):
    assert run(build_parser().parse_args(["--out", str(tmp_path), *extra])) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}" + (
        " (a subprocess step uses every GPU)" if "subprocess" in extra else ""
    )
