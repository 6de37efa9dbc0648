"""The machine a benchmark ran on, recorded beside its figures: CPU model, the flags that change speed, cores.

Figures from machines with native bf16 (AVX-512 BF16 / AMX) and from AVX2-only machines differ by more than
noise, so every result file names the flags it ran with, and the instruction sets torch was allowed to use: an
AVX-512 machine runs as an AVX2-only one with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` (oneDNN's
convolutions and ATen's own kernels both limited), which is how the AVX2 figures are measured here.
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
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "all"),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None}
