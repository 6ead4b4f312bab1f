"""The compute device a command runs on, and the dtype layer-by-layer work uses there."""

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


def compute_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; fp32 on CPUs, where half-precision matmuls crawl."""
    return torch.float16 if device.type == "cuda" else torch.float32
