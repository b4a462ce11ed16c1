"""One ManagerTower run: build the model and data of a recipe, train with HF Trainer (+ DeepSpeed), evaluate."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainingArguments, set_seed

from manager_plugin.managertower import ManagerTowerConfig, ManagerTowerHeadModel, ManagerTowerModel
from manager_plugin.managertower.processing_managertower import ManagerTowerProcessor, image_processor_for
from manager_plugin.managertower.tiny import build_tokenizer, tiny_config
from manager_plugin.managertower.unimodal import set_image_size

from ..ds_config import configure_cpu_deepspeed_state, skip_cpu_inference_comm_op
from .collators import TaskCollator
from .datasets import TaskDataset
from .optim import ManagerTowerTrainer
from .readers import read_records
from .recipe import ManagerTowerRecipe
from .synthetic import write_synthetic
from .tasks import TASKS
from .transforms import build_transform

logger = logging.getLogger(__name__)
DEEPSPEED_DIR = Path(__file__).resolve().parent.parent / "deepspeed"
METRICS_FILE = "eval_metrics.json"


def deepspeed_config(name_or_path: str | None) -> str | None:
    """`zero2` / `zero3` name the shipped `training/deepspeed/*.json`; anything else is a path."""
    if name_or_path is None:
        return None
    path = DEEPSPEED_DIR / f"{name_or_path}.json" if name_or_path in ("zero2", "zero3") else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no DeepSpeed config at {path}")
    return str(path)


def build_tokenizer_for(recipe: ManagerTowerRecipe) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer: `model.tokenizer`, else the checkpoint's, else the tiny one (synthetic runs)."""
    source = recipe.model.get("tokenizer") or recipe.model.get("init_from") or recipe.model.get("text_encoder")
    return AutoTokenizer.from_pretrained(source) if source else build_tokenizer()


def build_base_model(recipe: ManagerTowerRecipe, tokenizer: PreTrainedTokenizerBase) -> ManagerTowerModel:
    """A checkpoint (`model.init_from`), the uni-modal encoders (`text_encoder` + `vision_encoder`), or, with
    neither, a tiny model from scratch; at the recipe's image size."""
    model_section, image_size = recipe.model, recipe.data["image_size"]
    overrides = dict(model_section.get("config") or {})
    if model_section.get("init_from"):
        model = ManagerTowerModel.from_pretrained(model_section["init_from"])
        if model.config.vision_config.image_size != image_size:
            set_image_size(model, image_size)
        return model
    if model_section.get("text_encoder") or model_section.get("vision_encoder"):
        if not (model_section.get("text_encoder") and model_section.get("vision_encoder")):
            raise ValueError("model.text_encoder and model.vision_encoder are needed together")
        config = ManagerTowerConfig(**overrides)
        config.vision_config.image_size = image_size
        return ManagerTowerModel.from_unimodal_pretrained(
            model_section["text_encoder"], model_section["vision_encoder"], config
        )
    return ManagerTowerModel(tiny_config(len(tokenizer), image_size=image_size, **overrides))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(recipe: ManagerTowerRecipe, output_dir: str | Path, deepspeed: str | None) -> TrainingArguments:
    """HF `TrainingArguments` from the recipe; gradient accumulation reaches `global_batch_size` on this world."""
    settings = dict(recipe.training)
    global_batch = settings.pop("global_batch_size")
    per_step = settings["per_device_train_batch_size"] * _world_size()
    settings.setdefault("gradient_accumulation_steps", max(global_batch // per_step, 1))
    settings.setdefault("report_to", "none")
    config = deepspeed_config(deepspeed)
    if config is not None:
        skip_cpu_inference_comm_op()
        if configure_cpu_deepspeed_state(int(settings.get("ddp_timeout", 1800))):  # several CPU processes
            settings["accelerator_config"] = {
                **(settings.get("accelerator_config") or {}),
                "use_configured_state": True,
            }
    return TrainingArguments(output_dir=str(output_dir), remove_unused_columns=False, deepspeed=config, **settings)


def build_dataset(recipe: ManagerTowerRecipe, split: str, seed: int = 0) -> TaskDataset:
    """The `train` or `eval` dataset of the recipe; `seed` seeds its per-sample draws (false images, MLM masks)."""
    data = recipe.data
    records = read_records(data["format"], data.get("root", "."), data[split], recipe.task, data.get("image_root"))
    transform = build_transform(data[f"{split}_transform"], data["image_size"])
    return TaskDataset(records, transform, false_image=TASKS[recipe.task].false_image, seed=seed)


def build_collator(recipe: ManagerTowerRecipe, tokenizer: PreTrainedTokenizerBase, model: ManagerTowerHeadModel):
    data = recipe.data
    return TaskCollator(
        tokenizer,
        recipe.task,
        max_text_len=data["max_text_len"],
        num_labels=model.config.num_labels,
        mlm_probability=data.get("mlm_probability", 0.15),
    )


def evaluate(recipe: ManagerTowerRecipe, model: ManagerTowerHeadModel, tokenizer, output_dir: str | Path):
    """Score `model` on the recipe's eval split; write the metrics to `output_dir/eval_metrics.json`."""
    model.eval()
    settings = recipe.evaluation
    metrics = TASKS[recipe.task].evaluate(
        model,
        build_dataset(recipe, "eval"),
        build_collator(recipe, tokenizer, model),
        settings.get("batch_size", 32),
        settings.get("k_test", 128),
    )
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("eval metrics of %s: %s", recipe.name, metrics)
    return metrics


def run(
    recipe: ManagerTowerRecipe,
    output_dir: str | Path,
    *,
    synthetic: bool = False,
    overrides: dict[str, Any] | None = None,
    deepspeed: str | None = None,
    eval_only: bool = False,
) -> dict[str, float]:
    """Train (unless `eval_only`) and evaluate `recipe`; return the eval metrics."""
    output_dir = Path(output_dir)
    if synthetic:
        num_images = recipe.with_overrides(overrides or {}).synthetic.get("num_images", 8)
        # One copy per process (seeded, so identical): the ranks of a multi-process run never read a file being written.
        data_dir = output_dir / "synthetic-data" / (f"rank-{os.environ['RANK']}" if _world_size() > 1 else "")
        data_root = write_synthetic(recipe.task, data_dir, num_images)
        recipe = recipe.for_synthetic(data_root, overrides)
    elif overrides:
        recipe = recipe.with_overrides(overrides)
    head = TASKS[recipe.task].head
    tokenizer = build_tokenizer_for(recipe)
    if eval_only:
        if not recipe.model.get("init_from"):
            raise ValueError("--eval-only needs the model to evaluate (--model DIR, a checkpoint of this task's head)")
        model = head.from_pretrained(recipe.model["init_from"])
        return evaluate(recipe, model, tokenizer, output_dir)
    args = training_arguments(recipe, output_dir, deepspeed)
    set_seed(args.seed)  # a model built from scratch (or a new head) is then the same in every process and every run
    model = head.from_base_model(build_base_model(recipe, tokenizer), **(recipe.model.get("head") or {}))
    trainer = ManagerTowerTrainer(
        model=model,
        args=args,
        train_dataset=build_dataset(recipe, "train", seed=args.seed),
        data_collator=build_collator(recipe, tokenizer, model),
        lr_multipliers=recipe.optim.get("lr_multipliers", {}),
        no_decay=recipe.optim.get("no_decay", []),
    )
    trainer.train()
    trainer.save_model(str(output_dir))
    trainer.save_state()  # trainer_state.json: the per-step losses and gradient norms
    if not trainer.is_world_process_zero():
        return {}
    # The processor users call the model with: the tokenizer and the recipe's evaluation image transform.
    image_processor = image_processor_for(recipe.data["image_size"], recipe.data["eval_transform"])
    ManagerTowerProcessor(image_processor, tokenizer).save_pretrained(output_dir)
    # Evaluate the saved checkpoint on this process alone: under ZeRO-3 the live weights are sharded.
    return evaluate(recipe, head.from_pretrained(output_dir).to(trainer.args.device), tokenizer, output_dir)
