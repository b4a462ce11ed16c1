"""The `llava-manager` command: its subcommands from a directory holding `eval/`, `training/` and `benchmarks/`
packages of its own, one `error:` line and exit 2 with nothing written for each mistake, a model that is not there
refused within seconds with the hub unreachable, written files' modes following the umask, and the wheel's contents."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from llava_manager import cli
from llava_manager.models import check_model_reference, looks_like_path

PROJECT = Path(__file__).resolve().parents[1]
SHADOWED = ("eval", "training", "benchmarks")


def environment(**changes: str | None) -> dict[str, str]:
    """This process's environment with the project first on the path, one thread, and `changes` (None: unset)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
    }
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture
def shadowing_dir(tmp_path: Path) -> Path:
    """A working directory whose own `eval`, `training` and `benchmarks` packages fail when imported."""
    for name in SHADOWED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ImportError('the working directory {name}/ was imported')\n"
        )
    return tmp_path


# -- the console command ---------------------------------------------------------------------------------------------
def test_console_script_is_declared_and_every_subcommand_resolves():
    pyproject = (PROJECT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; the project supports 3.10)
    section = pyproject.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    entries = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, flags=re.MULTILINE))
    assert entries == {"llava-manager": "llava_manager.cli:main"}
    module, _, name = entries["llava-manager"].partition(":")
    assert getattr(importlib.import_module(module), name) is cli.main
    for command in cli.COMMANDS.values():
        function = cli.resolve(command.target)
        assert callable(function) and list(inspect.signature(function).parameters)[:2] == ["argv", "prog"], command


@pytest.mark.parametrize(
    "argv",
    [[name] for name in cli.COMMANDS if name != "eval"]
    + [["eval", sub] for sub in ("ablation", "run", "report", "manager-weights", "tasks", "include-path")],
)
def test_help_names_the_command_as_typed(argv, capsys):
    try:
        code = cli.main([*argv, "--help"])
    except SystemExit as exit_info:  # argparse's --help
        code = exit_info.code
    assert code in (0, None)
    assert capsys.readouterr().out.startswith(f"usage: llava-manager {' '.join(argv)}")


def test_python_m_forms_name_themselves(capsys):
    from eval.__main__ import main as eval_main
    from training.synthetic.__main__ import main as data_main

    assert eval_main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: python -m eval COMMAND")
    with pytest.raises(SystemExit):
        data_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m training.synthetic")


def run_command(argv: list[str], cwd: Path, **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, check=False, cwd=cwd, env=environment(**env), capture_output=True, text=True, timeout=300
    )


def test_subcommands_work_from_a_directory_with_eval_training_benchmarks_packages(shadowing_dir):
    python = [sys.executable, "-m", "llava_manager"]
    include = run_command([*python, "eval", "include-path"], shadowing_dir)
    assert include.returncode == 0 and include.stdout.strip() == str(PROJECT / "eval" / "tasks"), include.stderr
    data = run_command([*python, "data", "scenes", "--num_scenes", "2", "--preset", "easy"], shadowing_dir)
    assert data.returncode == 0 and (shadowing_dir / "scenes" / "stage1.yaml").is_file(), data.stderr
    # benchmarks: counts on `meta` in seconds, written under the working directory by default
    bench = run_command([*python, "bench", "--size", "tiny", "--device", "meta", "--no-plot"], shadowing_dir)
    assert bench.returncode == 0, bench.stderr
    assert sorted(path.name for path in (shadowing_dir / "runs" / "benchmarks").iterdir()) == [
        "tiny-meta.json",
        "tiny-meta.md",
    ]
    assert "Traceback" not in include.stderr + data.stderr + bench.stderr


def test_installed_console_script_from_a_shadowing_directory(shadowing_dir):
    script = Path(sys.executable).parent / "llava-manager"
    if not script.is_file():
        pytest.skip(f"{script} is not installed (the project is not reinstalled since the entry point was added)")
    result = run_command([str(script), "eval", "include-path"], shadowing_dir)
    assert result.returncode == 0 and Path(result.stdout.strip()).name == "tasks", result.stderr
    assert Path(result.stdout.strip(), "manager_tiny", "manager_tiny.yaml").is_file()


# -- mistakes: one error line, exit 2, nothing written ------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dir) -> dict[str, str]:
    """Existing inputs outside the working directory: the tiny model, a data file, an image folder."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    record = {
        "id": "0",
        "image": "missing.png",
        "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "red"}],
    }
    (root / "data.json").write_text(json.dumps([record]))
    return {"model": str(tiny_dir), "data": str(root / "data.json"), "images": str(root / "images")}


def train(inputs: dict[str, str], recipe: str = "stage1_manager", *extra: str, model: str | None = None) -> list[str]:
    return [
        "train", "--recipe", recipe, "--model_name_or_path", model or inputs["model"], "--data_path", inputs["data"],
        "--image_folder", inputs["images"], "--output_dir", "out", "--per_device_train_batch_size", "1",
        "--global_batch_size", "1", *extra,
    ]  # fmt: skip


MISTAKES = {
    "unknown recipe": (lambda i: train(i, "stage1_managr"), "unknown recipe 'stage1_managr'"),
    "model path": (lambda i: train(i, model="/x/nope"), "--model_name_or_path /x/nope: no such directory"),
    "mistyped model": (lambda i: train(i, model="tinyy"), "--model_name_or_path tinyy: no such directory"),
    "data path": (lambda i: [*train(i)[:6], "missing.json", *train(i)[7:]], "--data_path missing.json: no such file"),
    "manager type": (lambda i: train(i, "stage1_manager", "--manager_type", "adaptve"), "manager_type 'adaptve'"),
    "manager on baseline": (lambda i: train(i, "stage1", "--manager_type", "static"), "recipe stage1 has no manager"),
    "lora without llm": (lambda i: train(i, "stage1_manager", "--lora_r", "8"), "does not train it"),
    "deepspeed name": (lambda i: train(i, "stage1", "--deepspeed", "zero4"), "--deepspeed 'zero4'"),
    "missing image": (lambda i: train(i), "1 bad record(s) found before training"),
    "eval model": (
        lambda i: [
            "eval",
            "run",
            "--model",
            "llava_ov_manager",
            "--model_args",
            "pretrained=/x/nope,grid=true",
            "--tasks",
            "manager_tiny",
            "--output_path",
            "out",
        ],
        "--model_args pretrained=/x/nope: no such directory",
    ),
    "eval output": (lambda i: ["eval", "run", "--tasks", "manager_tiny"], "needs --output_path"),
    "report variant": (lambda i: ["eval", "report", "basline=r.json", "--out", "out"], "unknown variant 'basline'"),
    "weights path": (lambda i: ["eval", "manager-weights", "/x/nope", "--out", "out"], "/x/nope is neither"),
    "ablation variant": (lambda i: ["ablation", "--variants", "manager,grdi", "--out", "out"], "unknown ['grdi']"),
    "ablation model": (lambda i: ["ablation", "--model", "/x/nope", "--out", "out"], "--model /x/nope: no such"),
    "convert source": (lambda i: ["convert", "/x/nope", "out"], "/x/nope"),
    "bench image size": (
        lambda i: ["bench", "--image-size", "448", "--out", "out"],
        "--image-size '448': expected HxW",
    ),
    "demo model": (lambda i: ["demo", "--model", "/x/nope"], "--model /x/nope: no such directory"),
    "managertower recipe": (lambda i: ["managertower-train", "--recipe", "vqa", "--output-dir", "out"], "'vqa'"),
    "data scenes": (lambda i: ["data", "out", "--num_scenes", "0"], "--num_scenes 0: expected at least 1"),
    "script": (lambda i: ["script", "stage9"], "unknown script 'stage9'"),
    "command": (lambda i: ["trian"], "unknown command 'trian'"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_each_mistake_is_one_error_line_exit_2_and_nothing_written(case, inputs, tmp_path, monkeypatch, capsys):
    argv, expected = MISTAKES[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    code = cli.main(argv(inputs))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    if case != "missing image":  # after the data checks' progress bars, each bad record on a line of its own
        assert lines == errors, err
    assert list(tmp_path.iterdir()) == [], f"{case} wrote {list(tmp_path.iterdir())}"


def test_debug_shows_the_traceback(inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "0")  # restored afterwards: --debug sets it for the command's subprocesses
    with pytest.raises(ValueError, match="unknown recipe"):
        cli.main(["--debug", *train(inputs, "stage1_managr")])


def test_a_real_bug_keeps_its_traceback():
    def broken(argv, prog=None):
        raise AttributeError("a bug")

    with pytest.raises(AttributeError, match="a bug"):
        cli.run_main(broken, [])


@pytest.mark.parametrize("outcome", ["returns", "raises"])
def test_a_command_that_made_a_process_group_leaves_none_behind(outcome, tmp_path):
    import torch.distributed as dist

    def stage(argv, prog=None):  # as a training stage under torchrun: a process group of its own making
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
        if outcome == "raises":
            raise ValueError("a user error")
        return 0

    assert cli.run_main(stage, []) == (0 if outcome == "returns" else 2)
    assert not dist.is_initialized()


# -- model arguments: at once, offline or not -------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["/x/nope", "tinyy", "org/tinyy"])
def test_missing_model_fails_in_under_5_seconds_with_the_network_unreachable(model, tmp_path):
    (tmp_path / "data.json").write_text("[]")
    argv = [sys.executable, "-m", "llava_manager", "train", "--recipe", "stage1", "--model_name_or_path", model]
    argv += ["--data_path", "data.json", "--output_dir", "out"]
    # Port 9 (discard) refuses connections: the hub is unreachable, and HF_HUB_OFFLINE does not say so.
    started = time.monotonic()
    result = run_command(
        argv, tmp_path, HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None, HF_ENDPOINT="http://127.0.0.1:9"
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2 and elapsed < 5, (elapsed, result.stderr)
    assert result.stderr.startswith(f"error: --model_name_or_path {model}: no such directory"), result.stderr
    if model != "/x/nope":  # a possible hub id: the message says the hub could not be asked
        assert "the hub could not be reached" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.json"]


def test_hub_ids_are_taken_from_the_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "models--org--model" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_model_reference("org/model")  # cached: accepted without the network
    with pytest.raises(ValueError, match="org/other: no such directory, and not a hub model in the local cache"):
        check_model_reference("org/other")


def test_path_like_values_are_never_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert looks_like_path("./tiny") and looks_like_path("/abs/model") and looks_like_path("~/model")
    assert looks_like_path("out/stage1_manager")  # its first folder is here: a mistyped local path
    assert looks_like_path("a/b/c") and looks_like_path("bad name")
    assert not looks_like_path("llava-hf/llava-onevision-qwen2-0.5b-si-hf") and not looks_like_path("tinyy")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="file.txt: not a directory"):
        check_model_reference("file.txt")


# -- file modes --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask(umask, tmp_path, tiny_model):
    from llava_integration import apply_manager, save_manager
    from manager_plugin.io import staged_directory, write_atomically

    previous = os.umask(umask)
    try:
        write_atomically(tmp_path / "plain.txt", lambda name: Path(name).write_text("x"))
        with staged_directory(tmp_path / "staged") as staging:
            (staging / "inside.txt").write_text("x")
        apply_manager(tiny_model)
        save_manager(tiny_model, tmp_path / "adapter")
        reference = tmp_path / "reference.txt"
        reference.write_text("x")  # what open() gives under this umask
    finally:
        os.umask(previous)
    file_mode, directory_mode = 0o666 & ~umask, 0o777 & ~umask
    assert stat.S_IMODE(reference.stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "staged").stat().st_mode) == directory_mode
    for written in (tmp_path / "adapter").iterdir():
        assert stat.S_IMODE(written.stat().st_mode) == file_mode, written


# -- the wheel ---------------------------------------------------------------------------------------------------------
def test_wheel_carries_the_scripts_tasks_recipes_and_leaves_the_tree_clean(tmp_path):
    def tree_state() -> set[str]:
        listing = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
            cwd=PROJECT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return {
            line for line in listing.stdout.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line
        }

    before = tree_state()
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        check=False, cwd=PROJECT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    assert tree_state() == before, "the build left files in the source tree"
    (wheel,) = tmp_path.glob("llava_manager-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    scripts = {path.name for path in (PROJECT / "llava_manager" / "scripts").glob("*.sh")}
    assert scripts and {f"llava_manager/scripts/{name}" for name in scripts} <= names
    shipped_data = ["eval/tasks/manager_tiny/manager_tiny.yaml", "training/recipes/stage1_manager.yaml"]
    shipped_data += ["training/deepspeed/zero3.json", "eval/ablation/schedules/detail.yaml", "llava_manager/cli.py"]
    assert set(shipped_data) <= names
    assert "llava-manager = llava_manager.cli:main" in entry_points
    assert "llava_ov_manager = eval.registry:LLAVA_OV_MANAGER" in entry_points
    assert not any(name.startswith(("tests/", "build/")) for name in names)


# -- the lmms-eval entry point ------------------------------------------------------------------------------------------
def test_eval_registry_imports_before_lmms_eval_without_a_circular_import():
    code = (
        "import eval.registry\n"
        "from lmms_eval.models import get_model\n"
        "print(get_model('llava_ov_manager').__name__, eval.registry.LLAVA_OV_MANAGER.model_id)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=PROJECT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LlavaOvManager", "llava_ov_manager"]
    assert "circular import" not in result.stderr and "partially initialized" not in result.stderr


# -- quiet by default ---------------------------------------------------------------------------------------------------
def test_stage_options_use_the_current_names_and_no_pinned_memory_on_cpu(inputs, tmp_path, recwarn):
    from training.arguments import resolve_stage

    values = {"recipe": "stage1_manager", "model_name_or_path": inputs["model"], "data_path": inputs["data"]}
    values |= {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 1, "global_batch_size": 1}
    recipe_default = resolve_stage(values).training
    assert recipe_default.activation_checkpointing  # the recipe's current name
    assert recipe_default.activation_checkpointing_kwargs == {"use_reentrant": False}
    # the deprecated name given explicitly still overrides the recipe (HF alone would let the recipe's value win)
    explicit = resolve_stage({**values, "gradient_checkpointing": False}).training
    assert not explicit.activation_checkpointing and not explicit.gradient_checkpointing
    if not recipe_default.use_cpu and __import__("torch").cuda.is_available():
        pytest.skip("pinned memory is only turned off on CPU machines")
    assert not recipe_default.dataloader_pin_memory
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]


@pytest.mark.parametrize("family", ["llava_onevision", "llava", "llava_next"])
def test_tiny_models_carry_their_end_and_padding_ids(family, tiny_dir, tmp_path):
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    from llava_integration.tiny import write_tiny

    directory = tiny_dir if family == "llava_onevision" else write_tiny(tmp_path / family, family=family)
    tokenizer = AutoProcessor.from_pretrained(directory).tokenizer
    config, generation = AutoConfig.from_pretrained(directory), GenerationConfig.from_pretrained(directory)
    end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (config.text_config.eos_token_id, config.text_config.pad_token_id) == (end, pad)
    assert (generation.eos_token_id, generation.pad_token_id) == (end, pad)


def test_lmms_eval_plugin_refuses_a_missing_model_at_once():
    from eval.model import LlavaOvManager

    with pytest.raises(ValueError, match="llava_ov_manager pretrained=/x/nope: no such directory"):
        LlavaOvManager(pretrained="/x/nope", device="cpu")


def test_deepspeeds_cpu_notice_is_dropped_on_a_machine_without_cuda():
    import logging

    import torch

    cli.quiet_libraries()
    deepspeed_logger = logging.getLogger("DeepSpeed")
    notice = deepspeed_logger.makeRecord(
        "DeepSpeed",
        logging.WARNING,
        __file__,
        1,
        "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
        None,
        None,
    )
    other = deepspeed_logger.makeRecord(
        "DeepSpeed", logging.WARNING, __file__, 1, "ZeRO stage 3 partitions", None, None
    )
    assert bool(deepspeed_logger.filter(notice)) is torch.cuda.is_available()
    assert deepspeed_logger.filter(other)
