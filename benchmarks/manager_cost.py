"""What the manager costs: Baseline, +Manager, +Grid and +Grid+Manager measured side by side in one run.

    llava-manager bench --size small --repeats 7                 # (or python -m benchmarks ...)
    llava-manager bench --size 0.5b                              # on a CUDA machine: bf16, sdpa, MFU
    llava-manager bench --size 0.5b --device meta                # parameter and FLOP counts only, anywhere
    llava-manager bench --family llava_next --size tiny          # another LLaVA family at a size's shapes

Writes `<out>/<size>-<device>.{json,md,png}` (`<size>-<device>-<family>` for a family other than LLaVA-OneVision;
default out: runs/benchmarks under the working directory) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import sys
from functools import partial
from pathlib import Path

import torch
from transformers import PretrainedConfig

from llava_integration import apply_manager, manager_of
from llava_integration.families import FAMILY_BY_NAME
from llava_integration.patch import resolve_manager_config
from llava_manager.cli import UsageError, run_main
from manager_plugin import MANAGER_TYPES, ManagerConfig
from manager_plugin.provenance import environment_provenance

from . import flops as flop_model
from .inputs import make_batch, training_labels, workload
from .machine import describe, device_option
from .measure import (
    MANAGER_PAIRS,
    VARIANTS,
    Subject,
    family_variants,
    generate_timed,
    generate_tokens,
    prefill,
    step_peak_memories,
    synchronizer,
    time_generation,
    time_training,
    train_step,
)
from .report import markdown_table, mfu, overhead_ratios, plot, publish_results, spread
from .sizes import SIZES, build_config, build_model, build_processor

DEFAULT_FAMILY = "llava_onevision"

RESULTS = Path("runs/benchmarks")  # relative: under the working directory, never inside the installed package
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> argparse.Namespace:
    """The options, every one checked (a bad value is a `UsageError`) before anything is built."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument(
        "--family",
        choices=list(FAMILY_BY_NAME),
        default=DEFAULT_FAMILY,
        help="the LLaVA family built at --size: llava_onevision (SigLIP + Qwen2), the others CLIP + Llama",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda[:i] or meta (counts only); default: cuda if any")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, else bfloat16")
    parser.add_argument("--attention", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--image-size", default=None, help="HxW of every image, e.g. 448x448 (default: per size)")
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens per sample (default: per size)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens generated per decode measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=None, help="default: every one the family runs"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON, markdown and plot")
    parser.add_argument("--tag", default=None, help="file name stem (default: <size>-<device type>)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--manager-type", default="static", help="the manager of the manager variants (static, adaptive_last, ...)"
    )
    parser.add_argument(
        "--generate-tokens", type=int, default=32, help="tokens generate makes in the peak-memory measurement"
    )
    parser.add_argument("--memory-only", action="store_true", help="peak memory only, no timings")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.decode_tokens < 2:
        raise UsageError("need --repeats >= 1, --warmup >= 0 and --decode-tokens >= 2")
    runnable = family_variants(FAMILY_BY_NAME[args.family])
    unrunnable = [name for name in args.variants or [] if name not in runnable]
    if unrunnable:
        raise UsageError(
            f"--variants {' '.join(unrunnable)}: --family {args.family} runs {', '.join(runnable)} (LLaVA-1.5 has no "
            "grid, LLaVA-NeXT only its grid; LLaVA-OneVision switches between square and AnyRes images)"
        )
    if args.manager_type not in MANAGER_TYPES:
        raise UsageError(f"--manager-type {args.manager_type!r}: expected one of {', '.join(MANAGER_TYPES)}")
    for name in ("batch_size", "text_tokens", "threads", "generate_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: expected a positive number")
    _image_size(args.image_size, (1, 1))
    args.device = device_option(args.device, ("cpu", "cuda", "meta"))
    return args


def _image_size(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if text is None:
        return default
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--image-size {text!r}: expected HxW, e.g. 448x448") from None
    if height < 1 or width < 1:
        raise UsageError(f"--image-size {text!r}: expected positive sides, e.g. 448x448")
    return height, width


def _param_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())  # tied embeddings count once


def run(args: argparse.Namespace) -> dict:
    """Build the models and batches, count, measure, and return the result record."""
    device = args.device
    default_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # meta: the GPU setting it stands for
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    batch_size = args.batch_size or size.default_batch_size
    image_size = _image_size(args.image_size, size.default_image)
    text_tokens = args.text_tokens or size.default_text_tokens
    runnable = family_variants(FAMILY_BY_NAME[args.family])
    variants = [variant for name, variant in runnable.items() if args.variants is None or name in args.variants]

    processor = build_processor(size, args.family)
    config = build_config(size, processor, args.family)
    base = build_model(config, device, dtype, args.attention, seed=args.seed)
    models = {False: base}
    if any(variant.manager for variant in variants):
        # The same base weights, plus the manager.
        models[True] = apply_manager(copy.deepcopy(base), ManagerConfig(manager_type=args.manager_type))

    batches, labels, workloads = {}, {}, {}
    for aspect in {variant.aspect for variant in variants}:
        batch = make_batch(processor, aspect, batch_size, image_size, text_tokens, seed=args.seed)
        workloads[aspect] = workload(batch, config, aspect, base)
        labels[aspect] = training_labels(batch, config)
        if device.type != "meta":
            batch = batch.to(device)
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            labels[aspect] = labels[aspect].to(device)
        batches[aspect] = batch

    manager_config = resolve_manager_config(config, ManagerConfig(manager_type=args.manager_type))
    result = {
        "size": args.size,
        "family": args.family,
        "machine": describe(device),
        "provenance": environment_provenance(),
        "settings": {
            "dtype": str(dtype).removeprefix("torch."),
            "attention": args.attention,
            "batch_size": batch_size,
            "image_size": f"{image_size[0]}x{image_size[1]}",
            "text_tokens": text_tokens,
            "decode_tokens": args.decode_tokens,
            "generate_tokens": args.generate_tokens,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "manager_config": manager_config.to_dict(),
        },
        **variant_counts(config, manager_config, models, variants, workloads),
    }
    if device.type == "meta":
        return result
    subjects = _subjects(models, variants, batches, labels, device)
    result.update(_measure(subjects, args, device, result))
    result["machine"]["load_average_after"] = describe(device)["load_average_1_5_15"]
    return result


def variant_counts(
    config: PretrainedConfig, manager_config: ManagerConfig, models: dict, variants: list, workloads: dict
) -> dict:
    """Parameters and analytic FLOPs of every variant, and the manager's FLOP floor for each manager pair."""
    records = {}
    for variant in variants:
        work = workloads[variant.aspect]
        managed = manager_config if variant.manager else None
        forward = flop_model.forward_flops(config, work, managed, logits_tokens=work.batch_size * work.seq_len)
        flops = {
            "forward": forward,
            "prefill": flop_model.forward_flops(config, work, managed, logits_tokens=work.batch_size),
            "train": flop_model.training_flops(forward),
        }
        records[variant.name] = {
            "params": _param_count(models[variant.manager]),
            "manager_params": _param_count(manager_of(models[True])) if variant.manager else 0,
            "workload": work.to_dict(),
            "flops": flops,
            "flops_total": {kind: sum(components.values()) for kind, components in flops.items()},
        }
    floor = {
        variant: {
            kind: flop_model.manager_floor_ratio(records[variant]["flops"][kind], records[base]["flops"][kind])
            for kind in ("train", "prefill")
        }
        for variant, base in MANAGER_PAIRS.items()
        if variant in records and base in records
    }
    return {"variants": records, "floor": floor}


def _subjects(models: dict, variants: list, batches: dict, labels: dict, device: torch.device) -> list[Subject]:
    optimizers = {  # every parameter trains, as in stages 1.5 and 2
        with_manager: torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda" or None)
        for with_manager, model in models.items()
    }
    return [
        Subject(
            variant,
            models[variant.manager],
            optimizers[variant.manager],
            batches[variant.aspect],
            labels[variant.aspect],
        )
        for variant in variants
    ]


def _measure(subjects: list[Subject], args: argparse.Namespace, device: torch.device, result: dict) -> dict:
    """Peak memory, then interleaved timings; their summaries, the overhead ratios and MFU."""
    sync = synchronizer(device)
    steps = {}  # one untimed pass each, for memory ...
    for subject in subjects:
        steps[f"train/{subject.variant.name}"] = partial(train_step, subject)
        steps[f"prefill/{subject.variant.name}"] = partial(prefill, subject)
        steps[f"generate/{subject.variant.name}"] = partial(generate_tokens, subject, args.generate_tokens)
    peaks = step_peak_memories(steps, device)
    memory = {
        subject.variant.name: {
            f"{kind}_peak_{scope}": peaks[f"{kind}/{subject.variant.name}"][key]
            for kind in ("train", "prefill", "generate")
            for scope, key in (("bytes", "step"), ("total_bytes", "total"))
        }
        | {"weight_bytes": _weight_bytes(subject.model)}
        for subject in subjects
    }
    if args.memory_only:
        return {"memory": memory}
    for _ in range(args.warmup):  # ... then a clean warm-up of what is timed
        for subject in subjects:
            train_step(subject)
            generate_timed(subject, 2, sync)
    training = time_training(subjects, args.repeats, sync)
    generation = time_generation(subjects, args.repeats, args.decode_tokens, sync)

    timings, measurements = {}, {}
    peak_tflops = result["machine"].get("peak_bf16_tflops")
    batch_size = result["settings"]["batch_size"]
    for subject in subjects:
        name = subject.variant.name
        timings[name] = {**training[name], **generation[name]}
        totals = result["variants"][name]["flops_total"]
        summary = {metric: {**spread(values), "values": values} for metric, values in timings[name].items()}
        decode = summary["decode_s_per_step"]
        measurements[name] = {
            **summary,
            "decode_tokens_per_s": {key: batch_size / decode[key] for key in ("min", "median", "max")},
            **memory[name],
            "achieved_train_tflops": totals["train"] / summary["train_step_s"]["median"] / 1e12,
            "mfu_train": mfu(totals["train"], summary["train_step_s"]["median"], peak_tflops),
            "mfu_prefill": mfu(totals["prefill"], summary["prefill_s"]["median"], peak_tflops),
        }
    return {
        "memory": memory,
        "measurements": measurements,
        "ratios": overhead_ratios(timings),
        "grid_cost": overhead_ratios(timings, {"grid": "baseline"}).get("grid"),
    }


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied weights once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> dict:
    """Measure as the command line says; write and print the results."""
    args = parse_args(argv, prog)
    result = run(args)
    stem = args.tag or f"{args.size}-{result['machine']['device'].split(':')[0]}"
    if args.tag is None and args.family != DEFAULT_FAMILY:
        stem += f"-{args.family}"
    figure = (lambda path: plot(result, path)) if "measurements" in result and not args.no_plot else None
    publish_results(args.out, stem, result, markdown_table(result), figure)
    return result


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m benchmarks.manager_cost"))
