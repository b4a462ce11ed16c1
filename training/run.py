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

from transformers import AutoConfig, AutoProcessor, set_seed
from transformers.trainer_utils import get_last_checkpoint

from llava_integration import manager_of
from manager_plugin.provenance import environment_provenance

from .arguments import StageSetup, resolve_stage
from .checkpoint import publish_files, staging_dir
from .data import ConversationDataset, TrainingCollator, get_template, read_data, validate_data
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
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no checkpoint-N directory in {output_dir}")
        return last
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint directory")
    return str(resume)


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
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    resume = _resume_point(setup)

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
    )
    if checked.problems and args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"record": p.where, "reason": p.reason}) + "\n" for p in checked.problems]
        (output_dir / SKIPPED_RECORDS).write_text("".join(lines))
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
    )
    outcome = trainer.train(resume_from_checkpoint=resume)

    staging = staging_dir(output_dir / "model")
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed run
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if args.should_save:
        (staging / PROVENANCE).write_text(json.dumps(stage_provenance(setup, trainer.state.global_step), indent=1))
        publish_files(staging, output_dir)
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
    trainer.accelerator.wait_for_everyone()
    return StageResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        log_history=list(trainer.state.log_history),
        metrics=dict(outcome.metrics),
        skipped_records=len(checked.problems),
    )


def train_stage(recipe: str, **values: Any) -> StageResult:
    """Run a stage from Python: `recipe` plus any `StageArguments` / `TrainingArguments` fields as keywords."""
    return run_stage(resolve_stage({"recipe": recipe, **values}))
