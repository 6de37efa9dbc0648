"""The machine a benchmark ran on, recorded beside its figures: CPU model, the flags that change speed, cores.

Figures from machines with native bf16 (AVX-512 BF16 / AMX) and from AVX2-only machines differ by more than
noise, so every result file names the flags it ran with.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what moves fp32/bf16 throughput


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The :data:`SPEED_FLAGS` this CPU has (empty where /proc/cpuinfo is unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in SPEED_FLAGS if flag in present]
    except OSError:
        pass
    return []


def describe(device: torch.device | None = None) -> dict[str, object]:
    """What to print beside a figure: CPU, flags, cores, torch threads, the GPU when one was used."""
    return {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None}
