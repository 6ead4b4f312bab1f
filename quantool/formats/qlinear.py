"""QuantLinear: an nn.Linear replacement holding integer codes, with a reference path (dequantize, matmul)
and a packed int4 path through torch's tinygemm kernel (`aten._weight_int4pack_mm`, CUDA; `_for_cpu` on
CPU), as gpt-fast's `WeightOnlyInt4Linear` uses it: w = (q - 8) * scale + zero_f per group."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from quantool.quant.quantizer import dequantize_groups, group_index

TINYGEMM_GROUPS = (32, 64, 128, 256)


class QuantLinear(nn.Module):
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    _weight: torch.Tensor | None
    _packed: tuple[Any, ...] | None

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, dtype=torch.float16):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits = bits
        self.register_buffer("q", q.to(torch.uint8))
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero.to(torch.int32))
        self.register_buffer("g_idx", g_idx.to(torch.int32) if g_idx is not None else
                             group_index(self.in_features, self.in_features // scale.shape[0]))
        self.bias = nn.Parameter(bias.to(dtype), requires_grad=False) if bias is not None else None
        self.dtype = dtype
        self.kernel = "dequant"
        self._weight = None
        self._packed = None

    def dequantized(self) -> torch.Tensor:
        """The reference weight [out, in] in the compute dtype."""
        return dequantize_groups(self.q, self.scale, self.zero, self.g_idx).to(self.dtype)

    def use_kernel(self, kernel: str) -> str:
        """Choose 'dequant' (cache the dequantized weight, fp matmul) or 'tinygemm' (packed int4); returns the choice."""
        self._weight = self._packed = None
        self.kernel = "dequant"
        if kernel == "tinygemm" and self.tinygemm_ok():
            self._pack_tinygemm()
            self.kernel = "tinygemm"
        return self.kernel

    def tinygemm_ok(self) -> bool:
        """tinygemm takes 4-bit codes in equal groups of 32-256 columns (in any order: inputs are permuted)."""
        counts = torch.bincount(self.g_idx.long())
        g = int(counts[0])
        return (self.bits == 4 and g in TINYGEMM_GROUPS and bool(torch.all(counts == g)) and self.out_features % 8 == 0
                and self.in_features % 64 == 0)

    def _pack_tinygemm(self):
        perm = torch.argsort(self.g_idx, stable=True)
        self._perm = None if torch.equal(perm, torch.arange(self.in_features, device=perm.device)) else perm
        q = self.q.to(torch.int32)[:, perm]
        g = int(torch.bincount(self.g_idx.long())[0])
        scale = self.scale.float()
        zero_f = (8 - self.zero.float()) * scale
        self._sz = torch.stack([scale, zero_f], dim=-1).to(torch.bfloat16).contiguous()
        self._g = g
        if q.is_cuda:
            packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            self._packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        else:
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "tinygemm":
            shape = x.shape
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if self._perm is not None:
                x2 = x2[:, self._perm]
            mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
            y = mm(x2.contiguous(), self._packed, self._g, self._sz).to(x.dtype).reshape(*shape[:-1], self.out_features)
            return y + self.bias.to(y.dtype) if self.bias is not None else y
        if self._weight is None or self._weight.device != x.device or self._weight.dtype != x.dtype:
            self._weight = self.dequantized().to(device=x.device, dtype=x.dtype)
        return F.linear(x, self._weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, groups={self.scale.shape[0]}, kernel={self.kernel}"
