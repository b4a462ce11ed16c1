"""The machine a benchmark ran on, and the accelerator peak its MFU is measured against."""

from __future__ import annotations

import os
import platform

import torch

from llava_manager.cli import UsageError

# Dense bf16/fp16 tensor-core peaks (no sparsity) from the vendors' data sheets, in TFLOP/s, keyed by a substring of
# `torch.cuda.get_device_name()`; the first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.4,  # also GH200
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 (no bf16 on V100)
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by name, or None when the table does not know it."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def describe(device: torch.device) -> dict:
    """What a reader needs to compare these numbers: CPU, cores, load, and the accelerator (the library versions are
    in the result's `provenance`)."""
    info = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": _load(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            device_name=properties.name,
            device_memory_gib=round(properties.total_memory / 2**30, 1),
            compute_capability=f"{properties.major}.{properties.minor}",
            cuda=torch.version.cuda,
            peak_bf16_tflops=peak_tflops(properties.name),
        )
    elif device.type == "meta":
        info["device_name"] = "meta device (parameter and FLOP counts only)"
    else:
        info["device_name"] = f"CPU: {info['cpu']}"
    return info


def device_option(value: str | None, types: tuple[str, ...] = ("cpu", "cuda")) -> torch.device:
    """The `--device` of a benchmark: `value` (None: cuda if any, else cpu) checked to be of one of `types` and, for
    cuda, present on this machine; anything else is a `UsageError` naming it."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [name for kind in types for name in ((kind, f"{kind}:N") if kind == "cuda" else (kind,))]
    expected = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise UsageError(f"--device {value!r}: expected {expected}") from error
    if device.type not in types:
        raise UsageError(f"--device {value}: expected {expected}")
    if device.type == "cuda" and not torch.cuda.is_available():
        others = " or ".join(kind for kind in types if kind != "cuda")
        raise UsageError(f"--device {value}: no CUDA device on this machine (here: {others})")
    return device
