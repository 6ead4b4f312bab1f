"""The compute device a command runs on, and the dtypes work uses there."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from quantool.errors import QuantoolError


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when visible, else CPU), 'cpu', 'cuda', 'cuda:1' ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QuantoolError(f"--device {name} asked for, but no CUDA GPU is visible: use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise QuantoolError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from None


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; fp32 on CPUs, where half-precision matmuls crawl. Layer-by-layer quantization and
    perplexity use it."""
    return torch.float16 if device.type == "cuda" else torch.float32


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), as /proc/cpuinfo reports."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def computes_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here (faster than fp32): a CUDA GPU with bf16, or a CPU with bf16 units."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


@functools.cache
def compiles(device_type: str) -> bool:
    """Whether torch.compile can build kernels for this kind of device: a C++ compiler for CPUs (inductor's: $CXX,
    else g++), Triton for CUDA GPUs."""
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return device_type == "cpu" and shutil.which(os.environ.get("CXX") or "g++") is not None


def speed_dtype(device: torch.device) -> torch.dtype:
    """The dtype a user would run a model in for speed: fp16 on CUDA; bf16 on a CPU with bf16 units, else fp32
    (fp16 matmuls on CPUs without fp16 units are emulated and slow, so no speed-up is measured against them)."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32
