"""Summaries of a benchmark run: min/median/max, the manager's overhead ratios against its FLOP floor, MFU, and the
terminal/markdown table and the plot.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from manager_plugin.io import write_atomically

from .measure import MANAGER_PAIRS, VARIANTS

# Timed metrics: key in the results -> (label, unit scale, unit). Each also has a CPU-time twin (`CPU_TWIN`).
TIMED = {
    "train_step_s": ("training step", 1.0, "s"),
    "prefill_s": ("prefill (time to first token)", 1e3, "ms"),
    "decode_s_per_step": ("decode step", 1e3, "ms"),
}
# Which FLOP floor each timed metric is held to (decode: the manager does no work there, so 1).
FLOOR_OF = {"train_step_s": "train", "prefill_s": "prefill", "decode_s_per_step": None}


# The same measurements in process CPU time: on a shared CPU, time spent descheduled does not count there.
CPU_TWIN = {
    "train_step_s": "train_step_cpu_s",
    "prefill_s": "prefill_cpu_s",
    "decode_s_per_step": "decode_cpu_s_per_step",
}


def write_results(directory: Path, stem: str, result: dict, table: str) -> list[str]:
    """Write `result` as `<stem>.json` and its markdown `table` as `<stem>.md` in `directory` (each atomically, so an
    interrupted run never leaves a truncated figure behind); return the names written."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", table)):
        write_atomically(directory / f"{stem}{suffix}", lambda path, text=text: Path(path).write_text(text))
        names.append(f"{stem}{suffix}")
    return names


def publish_results(
    directory: Path, stem: str, result: dict, table: str, figure: Callable[[Path], None] | None = None
) -> None:
    """`write_results`, then `figure(<stem>.png)` when given, then the table and what was written, printed."""
    written = write_results(directory, stem, result, table)
    if figure is not None:
        figure(directory / f"{stem}.png")
        written.append(f"{stem}.png")
    print(table)
    print(f"wrote {', '.join(written)} in {directory}")


def spread(values: list[float]) -> dict[str, float]:
    """Min, median and max of repeated measurements."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def overhead_ratios(
    timings: dict[str, dict[str, list[float]]],
    pairs: dict[str, str] = MANAGER_PAIRS,
    metrics: Sequence[str] = (*TIMED, *CPU_TWIN.values()),
) -> dict[str, dict[str, dict[str, float]]]:
    """Per pair (variant -> its reference) and metric: per-repeat ratios (min/median/max), and the ratio of minimums.

    Repeats are interleaved, so repeat r of a variant and of its reference ran next to each other.
    """
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for variant, base in pairs.items():
        if variant not in timings or base not in timings:
            continue
        ratios[variant] = {}
        for metric in metrics:
            if metric not in timings[variant]:
                continue
            pairs_r = [a / b for a, b in zip(timings[variant][metric], timings[base][metric])]
            ratios[variant][metric] = {
                **spread(pairs_r),
                "of_min": min(timings[variant][metric]) / min(timings[base][metric]),
            }
    return ratios


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's dense peak."""
    if peak_tflops is None or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


def _fmt_spread(values: dict[str, float], scale: float, digits: int) -> str:
    return "/".join(f"{values[key] * scale:.{digits}f}" for key in ("min", "median", "max"))


def _subject(result: dict) -> str:
    """The size and, when not LLaVA-OneVision, the family measured (records before `--family` are OneVision's)."""
    family = result.get("family", "llava_onevision")
    return result["size"] if family == "llava_onevision" else f"{result['size']} {family}"


def markdown_table(result: dict) -> str:
    """The per-variant table and the overhead-ratio table, as markdown."""
    settings, machine, measured = result["settings"], result["machine"], result.get("measurements", {})
    lines = [
        f"### {_subject(result)} on {machine['device_name']}",
        "",
        f"{settings['dtype']}, {settings['attention']} attention, batch {settings['batch_size']}, one "
        f"{settings['image_size']} image and ~{settings['text_tokens']} text tokens per sample"
        + (
            f", {settings['repeats']} interleaved repeats, {machine['torch_threads']} torch threads, load average "
            f"{machine['load_average_1_5_15']} before and {machine.get('load_average_after')} after."
            if measured
            else "; counts only."
        ),
        "",
    ]
    header = ["variant", "params", "visual tokens", "train GFLOP", "prefill GFLOP"]
    if measured:
        header += [
            "train step s (min/med/max)",
            "train CPU s (med)",
            "prefill ms (min/med/max)",
            "prefill CPU ms (med)",
            "decode tok/s (med)",
            "train peak MiB (step / total)",
            "prefill peak MiB",
            "MFU train",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, info in result["variants"].items():
        row = [
            VARIANTS[name].label,
            f"{info['params'] / 1e6:.2f}M",
            str(info["workload"]["visual_tokens"]),
            f"{info['flops_total']['train'] / 1e9:.1f}",
            f"{info['flops_total']['prefill'] / 1e9:.1f}",
        ]
        if name in measured:
            m = measured[name]
            row += [
                _fmt_spread(m["train_step_s"], 1.0, 3),
                f"{m['train_step_cpu_s']['median']:.3f}" if "train_step_cpu_s" in m else "-",
                _fmt_spread(m["prefill_s"], 1e3, 1),
                f"{m['prefill_cpu_s']['median'] * 1e3:.1f}" if "prefill_cpu_s" in m else "-",
                f"{m['decode_tokens_per_s']['median']:.1f}",
                f"{m['train_peak_bytes'] / 2**20:.0f} / "
                + ("-" if m.get("train_peak_total_bytes") is None else f"{m['train_peak_total_bytes'] / 2**20:.0f}"),
                f"{m['prefill_peak_bytes'] / 2**20:.0f}",
                "-" if m.get("mfu_train") is None else f"{100 * m['mfu_train']:.1f}%",
            ]
        lines.append("| " + " | ".join(row) + " |")

    header = ["overhead", "metric", "FLOP floor"]
    if measured:
        header += [
            "wall ratio (min/med/max of interleaved pairs)",
            "wall ratio of minimums",
            "CPU-time ratio (min/med/max)",
            "CPU-time ratio of minimums",
            "median excess over floor (wall / CPU)",
        ]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, base in MANAGER_PAIRS.items():
        if variant not in result["floor"]:
            continue
        for metric, (label, _, _) in TIMED.items():
            if not measured and FLOOR_OF[metric] is None:
                continue
            floor = result["floor"][variant][FLOOR_OF[metric]] if FLOOR_OF[metric] else 1.0
            cells = [f"{VARIANTS[variant].label} / {VARIANTS[base].label}", label, f"{floor:.4f}"]
            if measured:
                ratios = result.get("ratios", {}).get(variant, {})
                for key in (metric, CPU_TWIN[metric]):
                    ratio = ratios.get(key)
                    cells += ["-", "-"] if ratio is None else [_fmt_spread(ratio, 1.0, 3), f"{ratio['of_min']:.3f}"]
                excess = [ratios[k]["median"] / floor - 1 for k in (metric, CPU_TWIN[metric]) if k in ratios]
                cells.append(" / ".join(f"{100 * e:+.1f}%" for e in excess) or "-")
            lines.append("| " + " | ".join(cells) + " |")
    if "memory" in result:
        lines += ["", *memory_table(result)]
    grid = result.get("grid_cost")
    if grid:
        flops = {
            kind: result["variants"]["grid"]["flops_total"][kind] / result["variants"]["baseline"]["flops_total"][kind]
            for kind in ("train", "prefill")
        }
        lines += [
            "",
            (
                f"The grid itself (+Grid / Baseline; paper: x4.39 training, x1.68 inference): FLOPs "
                f"x{flops['train']:.2f} train, x{flops['prefill']:.2f} prefill; measured median "
                f"x{grid['train_step_s']['median']:.2f} training step, x{grid['prefill_s']['median']:.2f} prefill (wall)."
            ),
        ]
    return "\n".join(lines) + "\n"


def memory_table(result: dict) -> list[str]:
    """Peak memory per variant and step, and each manager variant's peak over its reference's."""
    memory, settings = result["memory"], result["settings"]
    mib = 2**20
    lines = [
        (
            f"Peak memory (tensor bytes above the step's start; 'with weights' adds the parameters and buffers; "
            f"CUDA: allocator peaks), generate = prefill + {settings.get('generate_tokens', '?')} greedy tokens:"
        ),
        "",
        "| variant | weights MiB | train step MiB | prefill MiB | generate MiB | generate with weights MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, peaks in memory.items():
        lines.append(
            f"| {VARIANTS[name].label} | {peaks['weight_bytes'] / mib:.1f} | {peaks['train_peak_bytes'] / mib:.1f} | "
            f"{peaks['prefill_peak_bytes'] / mib:.1f} | {peaks['generate_peak_bytes'] / mib:.1f} | "
            f"{(peaks['generate_peak_bytes'] + peaks['weight_bytes']) / mib:.1f} |"
        )
    lines += [
        "",
        "| manager / reference | train step | prefill | generate | generate with weights |",
        "|---|---|---|---|---|",
    ]
    for variant, base in MANAGER_PAIRS.items():
        if variant not in memory or base not in memory:
            continue
        ours, theirs = memory[variant], memory[base]
        cells = [f"x{ours[f'{kind}_peak_bytes'] / theirs[f'{kind}_peak_bytes']:.3f}" for kind in ("train", "prefill")]
        cells.append(f"x{ours['generate_peak_bytes'] / theirs['generate_peak_bytes']:.3f}")
        with_weights = (ours["generate_peak_bytes"] + ours["weight_bytes"]) / (
            theirs["generate_peak_bytes"] + theirs["weight_bytes"]
        )
        cells.append(f"x{with_weights:.3f}")
        lines.append(f"| {VARIANTS[variant].label} / {VARIANTS[base].label} | " + " | ".join(cells) + " |")
    return lines


def plot(result: dict, path: Path) -> None:
    """Times per variant (median bars, min-max whiskers) and the manager's overhead ratios against the floor."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, and a lighter import

    measured = result["measurements"]
    names = list(measured)
    labels = [VARIANTS[name].label for name in names]
    colours = {"baseline": "#888888", "manager": "#dd6622", "grid": "#4488cc", "grid_manager": "#ee9922"}
    figure = Figure(figsize=(18, 4.6))
    axes = figure.subplots(1, 4)
    for axis, (metric, (title, scale, unit)) in zip(axes[:3], TIMED.items()):
        medians = [measured[n][metric]["median"] * scale for n in names]
        lows = [m - measured[n][metric]["min"] * scale for m, n in zip(medians, names)]
        highs = [measured[n][metric]["max"] * scale - m for m, n in zip(medians, names)]
        axis.bar(labels, medians, yerr=[lows, highs], capsize=4, color=[colours[n] for n in names])
        axis.set_title(f"{title}, wall time")
        axis.set_ylabel(unit)
        axis.tick_params(axis="x", labelsize=8)

    axis = axes[3]
    ticks, tick_labels = [], []
    for variant in result.get("ratios", {}):
        for metric in TIMED:
            position = len(ticks)
            floor = result["floor"][variant][FLOOR_OF[metric]] if FLOOR_OF[metric] else 1.0
            for key, offset, marker in ((metric, -0.12, "o"), (CPU_TWIN[metric], 0.12, "s")):
                ratio = result["ratios"][variant][key]
                axis.errorbar(
                    position + offset,
                    ratio["median"],
                    yerr=[[ratio["median"] - ratio["min"]], [ratio["max"] - ratio["median"]]],
                    fmt=marker,
                    color=colours[variant],
                    mfc="white" if marker == "s" else colours[variant],
                    capsize=3,
                )
            axis.hlines(floor, position - 0.35, position + 0.35, colors="k", linestyles="--")
            ticks.append(position)
            tick_labels.append(f"{'G+M' if variant == 'grid_manager' else 'M'}\n{metric.split('_')[0]}")
    axis.set_xticks(ticks, tick_labels, fontsize=8)
    axis.set_title("manager overhead: wall (dots), CPU time (squares)", fontsize=10)
    axis.set_ylabel("ratio over the variant without manager; dashes: floor", fontsize=8)
    figure.suptitle(
        f"manager cost, {_subject(result)} on {result['machine']['device_name']} ({result['settings']['dtype']}, "
        f"{result['settings']['repeats']} interleaved repeats; whiskers: min-max)"
    )
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.14, top=0.86, wspace=0.28)
    figure.savefig(path, dpi=100)
