"""Peak bytes of live tensors, traced op by op: what a job allocates, readable on any device.

A `TorchDispatchMode` sees every tensor that an ATen op returns, in forward, backward (the autograd
engine carries the mode into backward) and the optimizer step. Each new storage is counted until it is
freed (a weakref finalizer on the storage), so the running total is the sum of live tensor storages:
the quantity `torch.cuda.max_memory_allocated()` reports, without the CUDA caching allocator's 512-byte
rounding and without kernel scratch space that is not an ATen output (cuBLAS workspace, for example).
torch's own `torch.distributed._tools.mem_tracker` works the same way; this one keeps only the total
and what was live at the peak.

Use it to check the planner where no GPU is at hand: the tensors are the same on CPU, except where a
library picks another code path per device (bitsandbytes trains int8 layers with `MatMul8bitFp` on CPU,
`MatMul8bitLt` on CUDA).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Track live tensor bytes on one device type; `existing` tensors count from the start."""

    def __init__(self, device_type: str, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.device_type = device_type
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}  # storage address -> record index
        self._records: list[tuple[str, tuple[int, ...], str, int]] = []  # (op, shape, dtype, bytes)
        self._at_peak: list[int] = []
        for t in existing:
            self._track(t, "existing")
        self.start_bytes = self.live_bytes

    def _free(self, address: int):
        self.live_bytes -= self._records[self._live.pop(address)][3]

    def _track(self, t: torch.Tensor, op: str):
        storage = t.untyped_storage()
        address = storage._cdata  # the StorageImpl: views of one tensor share it
        if address in self._live:
            return
        self._live[address] = len(self._records)
        self._records.append((op, tuple(t.shape), str(t.dtype).removeprefix("torch."), storage.nbytes()))
        weakref.finalize(storage, self._free, address)
        self.live_bytes += storage.nbytes()
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self._at_peak = list(self._live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._track(t, func.__name__)
        return out

    def largest_at_peak(self, n: int = 10) -> list[dict]:
        """The n biggest (op, shape, dtype) groups of tensors live at the peak, in bytes."""
        groups: Counter = Counter()
        for index in self._at_peak:
            op, shape, dtype, nbytes = self._records[index]
            groups[op, shape, dtype] += nbytes
        return [{"op": op, "shape": list(shape), "dtype": dtype, "bytes": nbytes}
                for (op, shape, dtype), nbytes in groups.most_common(n)]
