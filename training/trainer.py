"""`StageTrainer`: HF's Trainer with only what the stages need changed.

- the optimizer gets named parameter groups with their own learning rates (`optim.GroupRule`), logged per group;
- the sampler groups each global batch by modality and length (`data.ModalityLengthGroupedSampler`);
- checkpoints are written under a staging name and renamed into place, so none is ever half-written; each holds the
  full HF model (LoRA merged), the processor, the optimizer / scheduler / RNG states, and for LLaVA-OneVision the
  manager adapter (any other `PreTrainedModel` trains too: nothing else here is LLaVA-specific);
- a LoRA checkpoint also keeps its trainable weights unmerged (`trainable.safetensors`), so it resumes exactly;
- a record that fails to decode in a step (its sample lists it under `data.BAD_RECORDS`) stops the run, naming the
  record and the checkpoint to resume from, or is logged and listed as `--on_bad_data` says.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from llava_integration import FAMILIES, manager_of, save_manager

from .checkpoint import lora_scalings, manager_weights, merged_lora_state_dict, replace_dir, staging_dir
from .data.dataset import BAD_RECORDS
from .data.sampler import ModalityLengthGroupedSampler
from .optim import GroupRule, param_groups

TRAINABLE_WEIGHTS = "trainable.safetensors"
logger = logging.getLogger(__name__)


class BadRecordError(RuntimeError):
    """A record failed to decode during training and --on_bad_data says stop."""


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


class StageTrainer(Trainer):
    """HF `Trainer` with named per-group learning rates, a modality/length sampler and atomic, merged checkpoints."""

    def __init__(
        self,
        *args,
        group_rules: Sequence[GroupRule],
        lengths: Sequence[int] | None = None,
        group_by_modality_length: bool = True,
        on_bad_data: str = "stop",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.group_rules = list(group_rules)
        self.lengths = lengths
        self.group_by_modality_length = group_by_modality_length
        self.on_bad_data = on_bad_data
        self.skipped_records: list[dict[str, str]] = []  # records that failed to decode in training, this rank's

    # -- optimizer and sampler ------------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = param_groups(
                opt_model,
                self.group_rules,
                self.args.learning_rate,
                self.args.weight_decay,
                set(self.get_decay_parameter_names(opt_model)),
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        args = self.args
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        seed = args.data_seed if args.data_seed is not None else args.seed
        return ModalityLengthGroupedSampler(self.lengths, global_batch, seed, self.group_by_modality_length)

    def _get_learning_rate(self) -> float:
        # HF asks for the learning rate right after the optimizer step, before the scheduler's: note each group's too.
        self._group_learning_rates = {
            f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups if "name" in group
        }
        return super()._get_learning_rate()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(getattr(self, "_group_learning_rates", {}))
        super().log(logs, start_time)

    # -- records that fail to decode in training ---------------------------------------------------------------------
    def compute_loss(self, model, inputs, *args, **kwargs):
        bad = inputs.pop(BAD_RECORDS, None)
        if bad:
            self._bad_records(bad)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _bad_records(self, bad: list[dict[str, str]]) -> None:
        """Stop naming the record and the checkpoint to resume from, or log and list it (its stand-in trains)."""
        step = self.state.global_step
        if self.on_bad_data == "stop":
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            resume = f"rerun with --resume_from_checkpoint {last}" if last else "rerun (no checkpoint yet)"
            raise BadRecordError(
                f"{bad[0]['record']}: {bad[0]['reason']}; stopped at step {step} (--on_bad_data stop): fix or remove "
                f"it and {resume}, or pass --on_bad_data skip"
            )
        known = {entry["record"] for entry in self.skipped_records}
        for entry in bad:
            if entry["record"] not in known:  # met again in a later epoch: replaced again, listed once
                logger.warning(
                    "skipping %s at step %d: %s (replaced in its batch)", entry["record"], step, entry["reason"]
                )
                self.skipped_records.append({**entry, "step": step})
                known.add(entry["record"])

    # -- saving -----------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """HF's checkpoint, assembled in a staging directory by every rank and renamed into place by the saver."""
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = staging_dir(run_dir / "checkpoints")
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(staging_root)  # super() writes where this says
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        best = self.state.best_model_checkpoint
        if best is not None and Path(best).parent == staging_root:  # recorded where super() wrote: say where it lands
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            if self.args.should_save:
                self.state.save_to_json(str(staging_root / final.name / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            replace_dir(staging_root / final.name, final)
            staging_root.rmdir()
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """HF's, except that LoRA under ZeRO-3 gathers the frozen weights too: the saved model is the merged one."""
        zero3 = self.is_deepspeed_enabled and self.accelerator.deepspeed_config["zero_optimization"]["stage"] == 3
        if not (zero3 and _is_peft(self.model)):
            return super().save_model(output_dir, _internal_call)
        # HF gathers only a PEFT model's trainable weights under ZeRO-3, which leaves nothing to merge LoRA into.
        self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.deepspeed))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The full HF model (LoRA merged), the manager adapter and the processor: a stage's loadable output."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if state_dict is None:
            state_dict = model.state_dict()
        if _is_peft(model):
            trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
            kept = {
                name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items() if name in trainable
            }
            save_file(kept, os.path.join(output_dir, TRAINABLE_WEIGHTS), metadata={"format": "pt"})
            state_dict = merged_lora_state_dict(state_dict, lora_scalings(model))
            model = model.get_base_model()
        model.save_pretrained(output_dir, state_dict=state_dict)
        is_llava = isinstance(model, tuple(family.model_class for family in FAMILIES))
        if is_llava and manager_of(model) is not None:
            save_manager(model, output_dir, state_dict=manager_weights(state_dict))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore the weights of a checkpoint (DeepSpeed restores its own engine state instead).

        A full model is read back with `from_pretrained` of its own class, which knows the on-disk key layout
        `save_pretrained` chose (HF's raw state-dict load does not); a LoRA model from its unmerged trainable weights.
        """
        model = self.model if model is None else model
        if _is_peft(model):
            path = Path(resume_from_checkpoint) / TRAINABLE_WEIGHTS
            weights = load_file(path)
            expected = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
            if set(weights) != expected:
                raise ValueError(
                    f"{path} does not match this model's trainable weights: missing "
                    f"{sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]}"
                )
            model.load_state_dict(weights, strict=False)
            return
        dtype = next(model.parameters()).dtype
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype)
        model.load_state_dict(saved.state_dict(), strict=True)
