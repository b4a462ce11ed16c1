"""`llava-manager ablation [options]` (or `python -m eval ablation`): the grid vs manager ablation end to end, resumable.

With no options, on the embedded default (the `detail` schedule): writes a tiny SigLIP and a tiny Qwen2, pretrains the
SigLIP so that its last layer keeps the coarse scene and loses the details (and probes its layers), assembles them
(stage 0), writes the synthetic data, trains the four variants through their stages (two stage runs side by side on
two cores), evaluates each on coarse and detail questions (manager_tiny_detail, manager_tiny_detail_mc), and writes the
report (markdown, CSV, PNG) and the report per kind of question (`--seeds N` repeats everything with N seeds, each Δ
with a 95% interval over seeds and documents). `--schedule easy` is the same pipeline with the random tower on the
easy scenes. With `--vision SIGLIP --llm QWEN2 --data DIR --tasks manager_local13` (or `--model DIR`, an existing
LLaVA-OneVision, instead of stage 0) the same steps run the real ablation with the recipes' own settings (the `full`
schedule). Finished steps are skipped on a re-run (`--force` redoes them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

from llava_manager.models import check_model_reference

from .launchers import LAUNCHERS, EvalJob, InProcessLauncher, StepFailed, SubprocessLauncher
from .plan import VARIANT_RECIPES, build_plan
from .progress import Progress, clock
from .schedule import Schedule, load_schedule, schedule_names
from .scheduler import StepScheduler, cpu_cores
from .steps import (
    PROBES,
    AblationError,
    EvalStep,
    Layout,
    Stage0Step,
    StageStep,
    Step,
    SyntheticDataStep,
    TinyUnimodalStep,
    TowerStep,
)

DEFAULT_OUT = Path("runs/ablation")
TRAINING_SEED = 42  # transformers.TrainingArguments' default seed
STAGE_MIXTURES = {"1": "stage1.yaml", "1.5": "stage1.5.yaml", "2": "stage2.yaml"}  # as training.synthetic writes them

EXAMPLES = """examples:
  {prog}                                   # the tiny ablation on CPU, one seed (under 5 minutes on 2 cores)
  {prog} --seeds 3                         # seeds 0-2 (reuses seed 0): probes, Δs per kind with intervals over seeds
  {prog} --schedule smoke --out /tmp/smoke # every step, 2 training steps each (seconds)
  {prog} --vision ckpt/siglip-so400m-patch14-384 --llm ckpt/Qwen2-0.5B-Instruct --data data/ \\
      --tasks manager_local13 --out runs/ablation_0.5b --launcher subprocess --nproc 8 \\
      --train-args "--deepspeed zero2" --model-args dtype=bfloat16 --eval-batch-size 8   # the paper's, on 8 GPUs
  {prog} ... --dry-run                     # print the steps and their commands, run nothing
"""


def build_parser(prog: str = "python -m eval ablation") -> argparse.ArgumentParser:
    """The ablation's options."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[1],
        epilog=EXAMPLES.format(prog=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where everything goes (default {DEFAULT_OUT})")
    parser.add_argument(
        "--vision", type=Path, help="a SigLIP directory: stage 0 assembles it with --llm (default: a tiny SigLIP)"
    )
    parser.add_argument("--llm", type=Path, help="a Qwen2 causal LM directory with its tokenizer, for stage 0")
    parser.add_argument(
        "--model", type=Path, help="a LLaVA-OneVision checkpoint to start stage 1 from instead of stage 0"
    )
    parser.add_argument(
        "--data",
        help="a directory holding stage1.yaml, stage1.5.yaml and stage2.yaml (LLaVA mixtures; images relative to it), "
        "or stage1=PATH,stage1.5=PATH,stage2=PATH (default: the synthetic data, written under --out)",
    )
    parser.add_argument("--image-folder", type=Path, help="the folder image paths are relative to (default: --data)")
    parser.add_argument("--tasks", help="lmms-eval tasks or groups, comma-separated (default: the schedule's)")
    parser.add_argument("--variants", default=",".join(VARIANT_RECIPES), help="which variants to run (default: all)")
    parser.add_argument(
        "--schedule",
        help=f"{', '.join(schedule_names())} or a YAML file (default: detail on the embedded default, full with --model or "
        "--vision)",
    )
    parser.add_argument("--train-args", default="", help='more `python -m training` options, e.g. "--deepspeed zero2"')
    parser.add_argument("--eval-args", default="", help="more `python -m eval run` options (subprocess launcher)")
    parser.add_argument("--model-args", default="", help="more llava_ov_manager --model_args, e.g. dtype=bfloat16")
    parser.add_argument("--eval-batch-size", type=int, help="lmms-eval batch size (default: the schedule's)")
    parser.add_argument("--limit", type=int, help="documents per task (default: the schedule's)")
    parser.add_argument(
        "--launcher",
        choices=["auto", *LAUNCHERS],
        default="auto",
        help="inprocess: every step in this process (fastest on CPU); subprocess: torchrun / `python -m eval run` "
        "per step (GPU nodes); auto: subprocess when CUDA is available (default)",
    )
    parser.add_argument("--nproc", type=int, help="processes per step, subprocess launcher (default: the GPU count)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: OMP_NUM_THREADS when set, else 1: on a small CPU more threads are slower "
        "for the tiny model)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="stage runs trained side by side, each in a worker process of --threads threads (in-process launcher; "
        "default: the CPU cores over --threads for the embedded tiny model, so 2 on 2 cores, else 1; 1 trains in this "
        "process, one run after another)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat the whole ablation with this many seeds (--seed, --seed + 1, ...; each under --out/seed_S, so a "
        "later run with more seeds reuses the finished ones) and report each Δ with a 95%% interval over seeds and "
        "documents (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--force", action="store_true", help="redo every step, even finished ones")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and their commands; run nothing")
    return parser


def stage_data(spec: str | None, image_folder: Path | None, layout: Layout) -> tuple[dict[str, Path], Path]:
    """The data mixture of each recipe stage ("1", "1.5", "2") and the image folder."""
    if spec is None:
        return {stage: layout.data / name for stage, name in STAGE_MIXTURES.items()}, image_folder or layout.data
    if "=" in spec:
        pairs = [item.partition("=") for item in spec.split(",") if item.strip()]
        named = {key.strip().removeprefix("stage"): Path(value) for key, _, value in pairs}
        folder = image_folder
    else:
        directory = Path(spec)
        named = {stage: directory / name for stage, name in STAGE_MIXTURES.items()}
        folder = image_folder or directory
    if set(named) != set(STAGE_MIXTURES):
        raise AblationError(f"--data {spec}: expected data for stages {list(STAGE_MIXTURES)}, got {sorted(named)}")
    missing = [str(path) for path in named.values() if not path.exists()]
    if missing:
        raise AblationError(f"--data {spec}: missing {', '.join(missing)}")
    return named, folder


def options_to_argv(options: dict) -> list[str]:
    """`{"max_steps": 3, "bf16": False}` as `["--max_steps", "3", "--bf16", "false"]`."""
    argv = []
    for key, value in options.items():
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return argv


def merge_model_args(*parts: str) -> str:
    """Comma-separated `key=value` lists merged left to right (a later key wins)."""
    merged: dict[str, str] = {}
    for part in parts:
        for item in filter(None, (item.strip() for item in part.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise AblationError(f"model argument {item!r}: expected key=value")
            merged[key] = value
    return ",".join(f"{key}={value}" for key, value in merged.items())


def choose_threads(threads: int | None) -> str:
    """Set torch's CPU threads (and OMP_NUM_THREADS for subprocesses); say what was chosen."""
    import torch

    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    threads = threads or 1
    if threads < 1:
        raise AblationError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return str(threads)


def choose_jobs(jobs: int | None, launcher, tiny: bool) -> int:
    """How many stage runs train side by side: only the in-process launcher runs them in workers of its own, and by
    default only for the embedded tiny model (a real model's copies would not fit a CPU's memory N times)."""
    import torch

    if jobs is not None and jobs < 1:
        raise AblationError(f"--jobs {jobs}: expected a positive number")
    if not isinstance(launcher, InProcessLauncher):
        if jobs not in (None, 1):
            raise AblationError(f"--jobs {jobs} needs --launcher inprocess (a subprocess step uses every GPU)")
        return 1
    if jobs is None:
        return max(1, cpu_cores() // torch.get_num_threads()) if tiny else 1
    return jobs


def choose_launcher(name: str, nproc: int | None):
    import torch

    if name == "auto":
        name = "subprocess" if torch.cuda.is_available() else "inprocess"
    if name == "inprocess":
        if nproc not in (None, 1):
            raise AblationError(f"--nproc {nproc} needs --launcher subprocess (in-process runs one process)")
        return InProcessLauncher()
    return SubprocessLauncher(nproc or max(1, torch.cuda.device_count()))


def seed_layouts(args: argparse.Namespace) -> dict[int, Layout]:
    """Where each seed's run goes: `--out/seed_S` (the report over all of them: `--out/report`)."""
    if args.seeds < 1:
        raise AblationError(f"--seeds must be at least 1, got {args.seeds}")
    return {seed: Layout(args.out / f"seed_{seed}") for seed in range(args.seed, args.seed + args.seeds)}


def build_steps(
    args: argparse.Namespace, schedule: Schedule, launcher, layout: Layout | None = None, seed: int = 0
) -> list[Step]:
    """Every step of one seed's run (under `layout`, default `--out/seed_<seed>`), in order: the seed sets the tower's
    pretraining, the tiny models' initial weights, the synthetic data and the training order."""
    layout = layout or Layout(args.out / f"seed_{seed}")
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(variants) - set(VARIANT_RECIPES))
    if unknown:
        raise AblationError(f"--variants: unknown {unknown}; expected some of {list(VARIANT_RECIPES)}")
    plan = build_plan({name: VARIANT_RECIPES[name] for name in variants})
    steps: list[Step] = []
    if (args.vision is None) != (args.llm is None):
        raise AblationError("--vision and --llm go together: stage 0 assembles the one with the other")
    if args.model is not None and args.vision is not None:
        raise AblationError("--model replaces stage 0: give either --model or --vision and --llm, not both")
    base_model = args.model or layout.stage0
    if args.model is None:
        vision, llm = args.vision, args.llm
        if vision is None:
            unimodal = TinyUnimodalStep(layout.unimodal, seed)
            steps.append(unimodal)
            vision, llm = unimodal.vision, unimodal.llm
            if schedule.tower:  # the tiny SigLIP learns its specialisation before it is assembled
                steps.append(TowerStep(vision, layout.tower, seed, dict(schedule.tower)))
                vision = layout.tower
        steps.append(Stage0Step(vision, llm, layout.stage0, {"seed": seed}))
    if args.data is None:
        steps.append(SyntheticDataStep(layout.data, {**schedule.synthetic, "seed": seed}))
    mixtures, image_folder = stage_data(args.data, args.image_folder, layout)
    train_args = shlex.split(args.train_args)
    for run in plan.stages:
        directory = layout.stage(run.recipe)
        # A stage-1 run starts from the base model: re-assembling it (stage 0) makes the run stale, as a retrained parent.
        parent = base_model if run.parent is None else layout.stage(run.parent)
        argv = ["--recipe", run.recipe, "--model_name_or_path", str(parent)]
        argv += ["--data_path", str(mixtures[run.stage]), "--image_folder", str(image_folder)]
        options = schedule.stage_options(run.stage)
        # Seed S offsets the schedule's training seed (default TrainingArguments' own, what `python -m training` uses):
        # seed 0 trains each stage exactly as run by hand, and as the runs before --seeds existed.
        options["seed"] = int(options.get("seed", TRAINING_SEED)) + seed
        argv += ["--output_dir", str(directory), *options_to_argv(options), *train_args]
        steps.append(StageStep(run, argv, directory, parent, launcher))
    settings = schedule.evaluation
    tasks = tuple(task.strip() for task in args.tasks.split(",") if task.strip()) if args.tasks else schedule.tasks
    for run in plan.evaluations:
        job = EvalJob(
            name=run.variant,
            checkpoint=layout.stage(run.recipe),
            output_dir=layout.evaluation(run.variant),
            tasks=tasks,
            model_args=merge_model_args(f"grid={str(run.grid).lower()}", settings.model_args, args.model_args),
            batch_size=args.eval_batch_size or settings.batch_size,
            limit=args.limit if args.limit is not None else settings.limit,
            extra_args=tuple(shlex.split(args.eval_args)),
        )
        steps.append(EvalStep(run, job, launcher))
    return steps


def chance_notes(tasks: tuple[str, ...], limit: int | None) -> list[str]:
    """What a model blind to the images scores on the generated tasks' documents, for the report."""
    from ..tiny_data import TASK_METRICS, chance_scores, shipped_documents

    notes = []
    # A task and its multiple-choice twin ask the same documents: one note for both, named by the first.
    for name in dict.fromkeys(task.removesuffix("_mc") for task in tasks if task in TASK_METRICS):
        documents = shipped_documents(limit, name)
        chance = chance_scores(documents)
        notes.append(
            f"chance on the {len(documents)} {name} documents (a model blind to the images): exact match "
            f"{100 * chance['exact_match']:.2f} (guessing a word of the answer's kind), multiple choice "
            f"{100 * chance['multiple_choice']:.2f} (guessing a choice)"
        )
        # A score is a mean of n Bernoulli outcomes: its standard error is at most 50 / sqrt(n) points, and the
        # difference of two independent scores needs about 2 * sqrt(2) of those to stand out at 95%.
        standard_error = 50 / math.sqrt(len(documents))
        notes.append(
            f"each score on {len(documents)} documents has a standard error of up to {standard_error:.1f} points: "
            f"a Δ within ±{2 * math.sqrt(2) * standard_error:.1f} is noise"
        )
    return notes


def write_ablation_report(layout: Layout, evaluations: list[EvalStep]) -> Path:
    """The report of the evaluated variants; returns its markdown file."""
    from ..report import write_report

    runs = {step.run_spec.variant: step.job.output_dir / "results.json" for step in evaluations}
    first = evaluations[0].job
    _, paths = write_report(runs, layout.report, notes=chance_notes(first.tasks, first.limit))
    return paths[0]


def write_seed_report(layouts: dict[int, Layout], evaluations: dict[int, list[EvalStep]], out: Path) -> Path | None:
    """The report per kind of question over every seed's run (None unless some tasks are generated ones)."""
    from ..intervals import document_scores
    from ..question_types import SeedRun, write_question_report
    from ..tiny_data import TASK_METRICS, shipped_documents

    first = evaluations[next(iter(layouts))][0].job
    tasks = [task for task in first.tasks if task in TASK_METRICS]
    if not tasks:
        return None
    runs = []
    for seed, layout in layouts.items():
        directories = {step.run_spec.variant: step.job.output_dir for step in evaluations[seed]}
        probes = layout.tower / PROBES
        runs.append(SeedRun(seed, directories, json.loads(probes.read_text()) if probes.is_file() else None))
    logged = all(
        document_scores(directory, task, TASK_METRICS[task]) is not None
        for run in runs
        for directory in run.evaluations.values()
        for task in tasks
    )
    if not logged:
        print(
            "note: no per-document scores in the evaluations' results: no report per kind of question", file=sys.stderr
        )
        return None
    kinds = {
        task: {document["question_id"]: document["kind"] for document in shipped_documents(first.limit, task)}
        for task in tasks
    }
    return write_question_report(runs, tasks, kinds, out)


def describe_model(args: argparse.Namespace) -> str:
    """Where stage 1 starts, for the first line of the log."""
    if args.model is not None:
        return str(args.model)
    if args.vision is not None:
        return f"stage 0 from {args.vision} + {args.llm}"
    return "tiny (embedded SigLIP + Qwen2, stage 0)"


def run(args: argparse.Namespace, launcher=None) -> int:
    """Run (or with `--dry-run`, list) every step of the ablation that `args` describe; return the exit code.

    `launcher` replaces the one `--launcher` chooses (anything with `train`, `evaluate` and their `*_command`s)."""
    try:
        if args.model is not None:
            check_model_reference(str(args.model), "--model ")
        for name in ("eval_batch_size", "nproc", "limit"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise AblationError(f"--{name.replace('_', '-')} {value}: expected a positive number")
        tiny = args.model is None and args.vision is None
        schedule = load_schedule(args.schedule or ("detail" if tiny else "full"))
        threads = choose_threads(args.threads)
        launcher = launcher or choose_launcher(args.launcher, args.nproc)
        jobs = choose_jobs(args.jobs, launcher, tiny)
        if args.eval_args and launcher.name == "inprocess":
            raise AblationError(f"--eval-args {args.eval_args!r} need --launcher subprocess (`python -m eval run`)")
        layouts = seed_layouts(args)
        seed_steps = {seed: build_steps(args, schedule, launcher, layout, seed) for seed, layout in layouts.items()}
    except (AblationError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    steps = [step for steps in seed_steps.values() for step in steps]
    evaluations = {seed: [step for step in steps if isinstance(step, EvalStep)] for seed, steps in seed_steps.items()}
    reports = len(layouts) + 1
    print(
        f"ablation: {len(steps) + reports} steps into {args.out} | model {describe_model(args)} | schedule "
        f"{schedule.name} ({schedule.description}) | seeds {list(layouts)} | launcher {launcher.name} | threads "
        f"{threads} | jobs {jobs}",
        flush=True,
    )
    progress = Progress(len(steps) + reports)
    try:
        if args.dry_run:
            for step in steps:
                reason = None if args.force else step.finished()
                progress.mark(step.label, f"skipped, {reason}" if reason else f"would run: {step.command()}")
            return 0
        import torch

        StepScheduler(jobs, torch.get_num_threads(), progress, args.force).run(steps)
        for seed, layout in layouts.items():
            with progress.step(f"report of {len(evaluations[seed])} variants (seed {seed})"):
                markdown = write_ablation_report(layout, evaluations[seed])
        with progress.step(f"report per kind of question over {len(layouts)} seed(s)"):
            by_kind = write_seed_report(layouts, evaluations, Layout(args.out).report)
    except (AblationError, StepFailed) as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1
    if len(layouts) == 1:
        print("\n" + markdown.read_text())
        print(f"report: {markdown}, {markdown.with_suffix('.csv')}, {markdown.with_suffix('.png')}")
    else:
        print(f"\nthe report of each seed: {', '.join(str(layout.report) for layout in layouts.values())}")
    if by_kind is not None:
        print("\n" + by_kind.read_text())
        print(f"report per kind of question: {by_kind}, {by_kind.with_suffix('.csv')}")
    if len(layouts) == 1:
        schedule_option = f" --schedule {args.schedule}" if args.schedule else ""
        print(
            "one seed cannot show significance: its intervals cover the documents, not the training noise; for "
            f"intervals over seeds run: llava-manager ablation{schedule_option} --seeds 3 --out {args.out} (reuses "
            "this seed's run)"
        )
    print(f"total time {clock(progress.elapsed())}")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m eval ablation") -> int:
    """The command line: parse the options and run."""
    return run(build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv))
