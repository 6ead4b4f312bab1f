"""Memory that only CUDA allocates, by compute capability: what a CPU trace of the same job cannot see.

Sources (torch 2.11): `aten/src/ATen/cuda/CublasHandlePool.cpp` for the cuBLAS workspace, and
`aten/src/ATen/native/transformers/cuda/sdp_utils.cpp` for the attention kernels each card can run
(see `attention.py`).
"""

from __future__ import annotations

from quantool.errors import QuantoolError

HOPPER = "9.0"


def parse_capability(cc: str) -> tuple[int, int]:
    """'9.0' -> (9, 0)."""
    try:
        major, minor = (int(part) for part in cc.split("."))
    except ValueError:
        raise QuantoolError(f"compute capability {cc!r} is not of the form MAJOR.MINOR, e.g. 9.0 for an H100") from None
    return major, minor


def cublas_workspace_bytes(cc: str) -> int:
    """torch's default cuBLAS workspace per (handle, stream): 32 MiB on sm90, else 4096 KiB x 2 + 16 KiB x 8
    (`parseChosenWorkspaceSize`). The caching allocator provides it, so `max_memory_allocated()` counts it,
    and it lives as long as the handle."""
    return 32 * 2**20 if parse_capability(cc) == (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8


def cublas_handles(training: bool) -> int:
    """Each thread that runs matmuls gets its own handle and workspace: the caller's thread, and in training the
    autograd engine's device thread, which runs backward (and the checkpointed recomputation)."""
    return 2 if training else 1
