"""One stage, end to end: data checked before anything trains, model set up, trained, saved atomically.

`train_stage(recipe, model_name_or_path=..., data_path=..., output_dir=..., **overrides)` is the programmatic entry
point; `python -m training` parses the same arguments from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import AutoConfig, AutoProcessor, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from llava_integration import manager_of
from manager_plugin.io import write_atomically
from manager_plugin.provenance import environment_provenance

from .arguments import StageSetup, resolve_stage
from .checkpoint import CONFIG_FILE, publish_files, staging_dir
from .data import ConversationDataset, TrainingCollator, get_template, read_data, validate_data
from .data.validation import default_cache_dir
from .model_setup import configure_processor, load_stage_model, part_rules, stage_image_mode
from .trainer import StageTrainer

logger = logging.getLogger(__name__)
SKIPPED_RECORDS = "skipped_records.jsonl"
PROVENANCE = "provenance.json"


@dataclass
class StageResult:
    """What a finished stage leaves: where its model is, its per-step logs and final metrics, the records skipped."""

    output_dir: Path
    global_step: int
    log_history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    skipped_records: int = 0

    @property
    def losses(self) -> list[float]:
        """The training loss at each logged step."""
        return [entry["loss"] for entry in self.log_history if "loss" in entry]


def _resume_point(setup: StageSetup) -> str | None:
    resume = setup.training.resume_from_checkpoint
    if resume is None or str(resume).lower() in ("", "false", "none"):
        return None
    if str(resume).lower() in ("true", "last", "latest"):
        output_dir = Path(setup.training.output_dir)
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None and (output_dir / CONFIG_FILE).is_file():
            raise FileExistsError(
                f"--resume_from_checkpoint {resume}: the stage in {output_dir} has finished and kept no checkpoint: "
                "nothing to resume (--overwrite_output_dir true trains it again)"
            )
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no checkpoint-N directory in {output_dir}")
        return last
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint directory")
    return str(resume)


def _claim_output_dir(setup: StageSetup, resume: str | None) -> None:
    """Refuse to train over a finished stage unless told to resume or overwrite; overwriting drops its checkpoints."""
    output_dir = Path(setup.training.output_dir)
    if not (output_dir / CONFIG_FILE).is_file() or resume is not None:
        return
    if not setup.stage.overwrite_output_dir:
        raise FileExistsError(
            f"--output_dir {output_dir} holds a finished stage's model: pass --overwrite_output_dir true to train it "
            "again, --resume_from_checkpoint true to continue from its last checkpoint, or another --output_dir"
        )
    if setup.training.should_save:
        _remove_checkpoints(output_dir)  # the new run's checkpoints must not be rotated against the old run's


def _remove_checkpoints(output_dir: Path) -> None:
    for checkpoint in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint)


def _refuse_data_parallel(setup: StageSetup) -> None:
    """One process driving several GPUs would train through `nn.DataParallel`, whose replicas share the manager's
    per-forward state (`llava_integration.runtime`): refuse it with the launch that works."""
    gpus = setup.training.n_gpu
    if gpus > 1:
        raise RuntimeError(
            f"one process sees {gpus} GPUs: HF Trainer would replicate the model with nn.DataParallel, whose replicas "
            f"share the manager's forward state; launch one process per GPU: torchrun --nproc_per_node {gpus} -m "
            "training ... (or make one GPU visible with CUDA_VISIBLE_DEVICES)"
        )


def _validation_cache(value: str | None) -> Path | None:
    if value is None:
        return default_cache_dir()
    return None if value.lower() in ("", "none", "false") else Path(value).expanduser()


def _gathered(items: list) -> list:
    """Every rank's `items`, concatenated in rank order (this rank's alone when not distributed)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(items)
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, list(items))
    return [item for share in shares for item in share]


def _write_skipped(output_dir: Path, entries: list[dict[str, str]]) -> None:
    """Add `entries` to the stage's list of skipped records."""
    path = output_dir / SKIPPED_RECORDS
    before = path.read_text() if path.is_file() else ""
    lines = "".join(json.dumps(entry) + "\n" for entry in entries)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: Path(temporary).write_text(before + lines))


def stage_provenance(setup: StageSetup, global_step: int) -> dict[str, Any]:
    """How a stage's model was made: the environment, the stage's arguments, processes, seed and steps."""
    args = setup.training
    return {
        **environment_provenance(),
        "stage": dataclasses.asdict(setup.stage),
        "seed": args.seed,
        "world_size": args.world_size,
        "deepspeed": args.deepspeed,  # the config file's path, or None
        "global_step": global_step,
    }


def run_stage(setup: StageSetup) -> StageResult:
    """Train one stage as `setup` says and write its model (loadable by `llava_integration.load_model`)."""
    recipe, stage, args = setup.recipe, setup.stage, setup.training
    _refuse_data_parallel(setup)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    resume = _resume_point(setup)
    _claim_output_dir(setup, resume)

    processor = AutoProcessor.from_pretrained(stage.model_name_or_path)
    image_mode = stage_image_mode(AutoConfig.from_pretrained(stage.model_name_or_path).model_type, recipe)
    configure_processor(processor, recipe, image_mode)
    template = get_template(recipe.template)
    checked = validate_data(
        read_data(stage.data_path, seed=args.seed),
        template=template,
        processor=processor,
        image_folder=stage.image_folder,
        image_aspect_ratio=image_mode,
        max_length=setup.model_max_length,
        on_bad_data=stage.on_bad_data,
        image_check=stage.image_check,
        num_workers=max(1, args.dataloader_num_workers),
        cache_dir=_validation_cache(stage.validation_cache),
    )
    if args.should_save and resume is None:  # a resumed run keeps the list its first part wrote
        (output_dir / SKIPPED_RECORDS).unlink(missing_ok=True)
        if checked.problems:
            _write_skipped(output_dir, [{"record": p.where, "reason": p.reason} for p in checked.problems])
    logger.info("%d records to train on, %d skipped", len(checked.records), len(checked.problems))

    model = load_stage_model(
        stage.model_name_or_path,
        recipe,
        manager_overrides=stage.manager_overrides,
        lora={"r": stage.lora_r, "alpha": stage.lora_alpha, "dropout": stage.lora_dropout},
        seed=args.seed,
    )
    managers = manager_of(model.get_base_model() if hasattr(model, "get_base_model") else model)
    uses_query = managers is not None and any(getattr(m, "query_type", None) for m in managers.modules())
    trainer = StageTrainer(
        model=model,
        args=args,
        train_dataset=ConversationDataset(checked.records, checked.lengths, template, processor, stage.image_folder),
        data_collator=TrainingCollator(processor, image_mode, setup.model_max_length, uses_query),
        processing_class=processor,
        group_rules=part_rules(recipe, args.learning_rate, stage.part_learning_rates),
        lengths=checked.lengths,
        group_by_modality_length=setup.group_by_modality_length,
        on_bad_data=stage.on_bad_data,
    )
    outcome = trainer.train(resume_from_checkpoint=resume)

    staging = staging_dir(output_dir / "model")
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed run
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    first_skips: dict[str, dict] = {}  # two ranks may meet the same bad record in different epochs
    for entry in _gathered(trainer.skipped_records):
        first_skips.setdefault(entry["record"], entry)
    skipped_in_training = list(first_skips.values())
    if args.should_save:
        if skipped_in_training:
            _write_skipped(output_dir, skipped_in_training)
        (staging / PROVENANCE).write_text(json.dumps(stage_provenance(setup, trainer.state.global_step), indent=1))
        publish_files(staging, output_dir)
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
        if not stage.keep_last_checkpoint:
            _remove_checkpoints(output_dir)  # optimizer states: GBs per stage, of no use once the model is published
    trainer.accelerator.wait_for_everyone()
    return StageResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        log_history=list(trainer.state.log_history),
        metrics=dict(outcome.metrics),
        skipped_records=len(checked.problems) + len(skipped_in_training),
    )


def train_stage(recipe: str, **values: Any) -> StageResult:
    """Run a stage from Python: `recipe` plus any `StageArguments` / `TrainingArguments` fields as keywords."""
    return run_stage(resolve_stage({"recipe": recipe, **values}))
