"""The manager's prefill overhead alone, against its FLOP floor: one prefill forward of each variant, interleaved.

    python -m benchmarks.prefill --size small384 --rounds 11 --out benchmarks/results

Each manager variant and the variant without it (+Manager and Baseline, +Grid+Manager and +Grid) run back to back
every round, the order alternating, on the same weights and batches; the ratio is taken per round and summarised by
the median (back to back, a change in the machine's load between the two runs of a round is least likely). No training step, decode or memory measurement: the full benchmark (`python -m benchmarks`) has those.
Writes `<out>/<size>-prefill-<device>.{json,md}` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from llava_integration import apply_manager
from llava_integration.patch import resolve_manager_config
from llava_manager.cli import UsageError, run_main
from manager_plugin import MANAGER_TYPES, ManagerConfig
from manager_plugin.provenance import environment_provenance

from .inputs import make_batch, workload
from .machine import describe, device_option
from .manager_cost import RESULTS, variant_counts
from .measure import MANAGER_PAIRS, VARIANTS, Subject, interleaved, prefill, synchronizer, timed_prefill
from .report import overhead_ratios, publish_results, spread
from .sizes import SIZES, build_config, build_model, build_processor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked before anything is built."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.prefill",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="small384")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--manager-type", default="static", help="the manager of the manager variants")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and markdown")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        raise UsageError(
            f"need --rounds >= 1, --warmup >= 0, --threads >= 1 (got {args.rounds}, {args.warmup}, {args.threads})"
        )
    if args.manager_type not in MANAGER_TYPES:
        raise UsageError(f"--manager-type {args.manager_type!r}: expected one of {', '.join(MANAGER_TYPES)}")
    args.device = device_option(args.device)
    return args


def run(args: argparse.Namespace) -> dict:
    """Build the models and batches, time the prefills, and return the result record."""
    device = args.device
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    processor = build_processor(size)
    config = build_config(size, processor)
    base = build_model(config, device, dtype, "sdpa")
    manager = ManagerConfig(manager_type=args.manager_type)
    models = {False: base, True: apply_manager(copy.deepcopy(base), manager)}
    variants = list(VARIANTS.values())
    batches, workloads = {}, {}
    for aspect in {variant.aspect for variant in variants}:
        batch = make_batch(processor, aspect, size.default_batch_size, size.default_image, size.default_text_tokens)
        workloads[aspect] = workload(batch, config, aspect, base)
        batch = batch.to(device)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        batches[aspect] = batch
    counts = variant_counts(config, resolve_manager_config(config, manager), models, variants, workloads)
    subjects = {v.name: Subject(v, models[v.manager], None, batches[v.aspect], None) for v in variants}
    machine = describe(device)
    sync = synchronizer(device)
    timings = {}
    for variant, base in MANAGER_PAIRS.items():
        pair = [subjects[base], subjects[variant]]
        for _ in range(args.warmup):
            for subject in pair:
                prefill(subject)
        timings |= interleaved(pair, args.rounds, lambda subject: timed_prefill(subject, sync), f"prefill {variant}")
    machine["load_average_after"] = describe(device)["load_average_1_5_15"]
    return {
        "size": args.size,
        "machine": machine,
        "provenance": environment_provenance(),
        "settings": {
            "dtype": str(dtype).removeprefix("torch."),
            "image_size": "x".join(map(str, size.default_image)),
            "text_tokens": size.default_text_tokens,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "manager_type": args.manager_type,
        },
        "workloads": {name: info["workload"] for name, info in counts["variants"].items()},
        "floor": {variant: floors["prefill"] for variant, floors in counts["floor"].items()},
        "timings": {
            name: {metric: {**spread(values), "values": values} for metric, values in metrics.items()}
            for name, metrics in timings.items()
        },
        "ratios": overhead_ratios(timings),
    }


def markdown_table(result: dict) -> str:
    """The per-pair ratios against the floor, as markdown."""
    machine, settings = result["machine"], result["settings"]
    lines = [
        f"### {result['size']} prefill on {machine['device_name']}",
        "",
        (
            f"{settings['dtype']}, sdpa, one {settings['image_size']} image and ~{settings['text_tokens']} text "
            f"tokens, {settings['manager_type']} manager, {settings['rounds']} interleaved rounds, "
            f"{machine['torch_threads']} torch threads, load average {machine['load_average_1_5_15']} before and "
            f"{machine['load_average_after']} after."
        ),
        "",
        (
            "| pair | visual tokens | prefill ms (median, without / with) | FLOP floor | wall ratio (min/med/max) "
            "| CPU-time ratio (min/med/max) | median over floor (wall / CPU) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for variant, base in MANAGER_PAIRS.items():
        ratios, floor = result["ratios"][variant], result["floor"][variant]
        times = [result["timings"][name]["prefill_s"]["median"] * 1e3 for name in (base, variant)]
        cells = [
            f"{VARIANTS[variant].label} / {VARIANTS[base].label}",
            str(result["workloads"][variant]["visual_tokens"]),
            f"{times[0]:.0f} / {times[1]:.0f}",
            f"{floor:.4f}",
            *(
                "/".join(f"{ratios[key][stat]:.3f}" for stat in ("min", "median", "max"))
                for key in ("prefill_s", "prefill_cpu_s")
            ),
            " / ".join(f"{100 * (ratios[key]['median'] / floor - 1):+.1f}%" for key in ("prefill_s", "prefill_cpu_s")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Measure as the command line says; write and print the results."""
    args = parse_args(argv)
    result = run(args)
    stem = f"{args.size}-prefill-{result['machine']['device'].split(':')[0]}"
    publish_results(args.out, stem, result, markdown_table(result))
    return result


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m benchmarks.prefill"))
