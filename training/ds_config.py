"""DeepSpeed configs: `--deepspeed zero2 | zero3 | PATH`, resolved to a JSON file.

The shipped configs (`deepspeed/zero2.json`, `deepspeed/zero3.json`) have no `optimizer` or `scheduler` section on
purpose: the Trainer then builds the optimizer from our named parameter groups (per-part learning rates) and the
cosine schedule, which a DeepSpeed-built optimizer would ignore; and no fused-Adam op needs compiling. Every batch,
precision and clipping value is "auto", filled in from `TrainingArguments`.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "deepspeed"
SHIPPED = {path.stem: path for path in sorted(CONFIG_DIR.glob("*.json"))}


def resolve_deepspeed(value: str | None) -> str | None:
    """The config file for a shipped name (`zero2`, `zero3`) or an existing path; None for no DeepSpeed."""
    if value in (None, "", "none"):
        return None
    if value in SHIPPED:
        return str(SHIPPED[value])
    if Path(value).expanduser().is_file():
        return str(Path(value).expanduser())
    raise ValueError(f"--deepspeed {value!r}: expected one of {sorted(SHIPPED)} or the path of a DeepSpeed JSON config")


def skip_cpu_inference_comm_op() -> None:
    """On a CPU-only machine, do not JIT-compile DeepSpeed's shared-memory communication op (~60 s on first use).

    DeepSpeed builds it when its communication backend starts, but only its inference all-reduce uses it; training
    collectives go through torch.distributed (gloo), so a training run loses nothing without it.
    """
    import torch

    if torch.cuda.is_available():
        return
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def configure_cpu_deepspeed_state(timeout_seconds: int) -> bool:
    """Start accelerate's process state for a multi-process DeepSpeed run on a CPU-only machine; True if started.

    Without CUDA, accelerate lets DeepSpeed start the process group but records one process at index 0 on every rank,
    and `TrainingArguments` sizes the DeepSpeed batch from that count. So the state is started here, its count and
    rank corrected from torch.distributed, and `TrainingArguments` told to use it (`use_configured_state`).
    """
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(timeout=timedelta(seconds=timeout_seconds))
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    state.num_processes = dist.get_world_size()
    state.process_index = dist.get_rank()
    return True
