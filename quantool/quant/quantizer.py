"""Group-wise affine integer quantization of a weight matrix [out, in], shared by RTN, GPTQ, AWQ and QAT.

Conventions follow GPTQ's reference `quant.py` (and the GPTQ v1 checkpoint format): q in [0, 2^bits - 1],
w ~= scale * (q - zero); symmetric uses zero = 2^(bits-1); groups run along the input dimension, and a
width that is not a multiple of the group size ends in a partial group (g_idx maps columns to groups).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from quantool.errors import QuantoolError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: one group per output row (per channel)
    sym: bool = True
    min_zero: int = 0  # 1 for the GPTQ v1 layout, which stores zero - 1 and cannot hold zero = 0
    mse: bool = False  # shrink each group's range to the least rounding error instead of min-max (see qparams)
    full_range: bool = False  # symmetric: all 2^bits codes, the largest |w| on the extra negative one (see _affine)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_size_for(self, in_features: int) -> int:
        """Columns per group in a layer of this width: the whole row for per channel or a group wider than the row."""
        g = self.group_size
        return in_features if g == -1 or g >= in_features else g

    def groups_for(self, in_features: int) -> int:
        """Number of groups, the last one partial where the width is not a multiple of the group size."""
        return -(-in_features // self.group_size_for(in_features))

    def with_group(self, group_size: int) -> QuantSpec:
        return replace(self, group_size=group_size)

    def validate(self, allowed_bits: tuple[int, ...] = SUPPORTED_BITS) -> QuantSpec:
        if self.bits not in allowed_bits:
            raise QuantoolError(f"--bits {self.bits} is not supported here: choose {', '.join(map(str, allowed_bits))}")
        if self.group_size != -1 and (self.group_size < 1 or self.group_size & (self.group_size - 1)):
            raise QuantoolError(f"--group-size {self.group_size} must be a power of two such as 32, 64, 128, or -1 (per channel)")
        return self


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx: the group of each input column, for contiguous groups of group_size columns."""
    return (torch.arange(in_features) // group_size).to(torch.int32)


@dataclass
class QuantizedWeight:
    """One quantized linear: codes [out, in] (uint8: at most 8 bits, a quarter of int32's memory), per-group
    scale/zero [groups, out], g_idx [in], and its bias."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None = None

    def __post_init__(self):
        self.q = self.q.to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(self.q, self.scale, self.zero, self.g_idx)

    def rows(self, lo: int, hi: int) -> QuantizedWeight:
        """Output rows lo..hi as their own weight (one part of a fused matrix, e.g. an expert's gate of gate_up)."""
        return QuantizedWeight(self.q[lo:hi], self.scale[:, lo:hi].contiguous(), self.zero[:, lo:hi].contiguous(), self.g_idx,
                               None if self.bias is None else self.bias[lo:hi])

    @property
    def group_size(self) -> int:
        """Columns per group (the first group's, should the last be partial); -1 for one group per row."""
        return -1 if self.scale.shape[0] == 1 else int((self.g_idx == 0).sum())

    @classmethod
    def from_rtn(cls, w: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None = None) -> QuantizedWeight:
        """Round-to-nearest codes of w [out, in] in contiguous groups, on the CPU."""
        q, scale, zero = quantize_groups(w, spec)
        return cls(q.cpu(), scale.cpu(), zero.cpu(), group_index(w.shape[1], spec.group_size_for(w.shape[1])), bias)


def qparams(w: torch.Tensor, spec: QuantSpec, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of w (each row is one group). Returns float scale, float zero.

    Min-max by default. With spec.mse, the range [p * min, p * max] for p from 1 down to 1 - max_shrink in
    steps of 1 / grid that minimizes sum |Q(w) - w|^norm, as GPTQ's reference `Quantizer.find_params(mse=True)`
    (same grid, shrink and norm): at 3 bits and below a clipped outlier costs less than a coarse grid."""
    wmin = w.min(dim=1).values.clamp(max=0)
    wmax = w.max(dim=1).values.clamp(min=0)
    if spec.sym and not spec.full_range:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    dead = (wmin == 0) & (wmax == 0)
    wmin, wmax = torch.where(dead, -1.0, wmin), torch.where(dead, 1.0, wmax)
    if not spec.mse:
        return _affine(wmin, wmax, spec)
    shrink = 1 - torch.arange(int(max_shrink * grid), device=w.device, dtype=w.dtype)[:, None] / grid  # [steps, 1]
    # all steps at once, rows in chunks of ~1 MiB: per [1536, 64] call on 2 EPYC cores with the pipeline's allocator
    # settings 11 ms, against 20 ms in 16 MiB chunks (their buffers are mapped afresh each time), 13-17 ms in smaller
    rows = max(1, (1 << 18) // (shrink.shape[0] * w.shape[1]))
    scale, zero = torch.empty_like(wmin), torch.empty_like(wmin)
    for r in range(0, w.shape[0], rows):
        s1, z1 = _affine(shrink * wmin[r:r + rows], shrink * wmax[r:r + rows], spec)  # [steps, rows]
        err = _power(_rounding_error(w[r:r + rows], s1[..., None], z1[..., None], spec.maxq), norm).sum(dim=-1)
        best = err.argmin(dim=0, keepdim=True)  # the first minimum: the widest range among equals, as the reference
        scale[r:r + rows], zero[r:r + rows] = s1.gather(0, best)[0], z1.gather(0, best)[0]
    return scale, zero


def _rounding_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """|dequantize(quantize(w)) - w|, the same operations in place on one buffer (the grid search's hot loop)."""
    return (w / scale).round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale).sub_(w).abs_()


def _power(e: torch.Tensor, norm: float) -> torch.Tensor:
    """e^norm in place for e >= 0, as 2^(norm * log2 e): twice as fast as pow_ on a CPU (equal to ~3e-6
    relative; 0 stays 0)."""
    return e.log2_().mul_(norm).exp2_()


def _affine(wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero mapping [wmin, wmax] onto the codes 0..maxq (zero at mid-range when symmetric).

    Symmetric full range (llama.cpp's, AutoRound's `int_sym`): the codes reach one step further below zero than
    above it, so the group's largest |w| takes that extra code, with a negative scale if it is positive: a step
    of max|w| / 2^(bits-1) instead of max|w| / (2^(bits-1) - 1/2), 6 % finer at 4 bits, 12.5 % at 3."""
    if spec.sym and spec.full_range:
        half = (spec.maxq + 1) // 2
        scale = torch.where(-wmin > wmax, -wmin, -wmax) / half
        return scale, torch.full_like(scale, half)
    scale = (wmax - wmin) / spec.maxq
    zero = torch.full_like(scale, (spec.maxq + 1) // 2) if spec.sym else torch.round(-wmin / scale).clamp(spec.min_zero, spec.maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) for w given per-row (broadcastable) scale and zero; one temporary, worked in place."""
    return (w / scale).round_().add_(zero).clamp_(0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def pad_to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Zero columns up to a whole number of groups: they never widen a group's range, which always holds 0."""
    pad = -w.shape[-1] % group_size
    return F.pad(w, (0, pad)) if pad else w


def _groups_as_rows(w: torch.Tensor, spec: QuantSpec, scale_dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] zero-padded to whole groups, one group per row (row r's groups in order), with each row's
    scale (rounded to scale_dtype as stored, back in float32) and zero, both [rows, 1]."""
    g = spec.group_size_for(w.shape[1])
    wg = pad_to_groups(w.float(), g).reshape(-1, g)
    scale, zero = qparams(wg, spec)
    return wg, scale.to(scale_dtype).float()[:, None], zero[:, None]


def quantize_groups(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float16
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN over groups. Returns (q [out, in] uint8, scale [groups, out], zero [groups, out] int32).

    Scales are rounded to scale_dtype first, so the stored checkpoint dequantizes to exactly these values.
    """
    out_f, in_f = w.shape
    wg, scale, zero = _groups_as_rows(w, spec, scale_dtype)
    q = quantize(wg, scale, zero, spec.maxq).reshape(out_f, -1)[:, :in_f]
    return (q.to(torch.uint8), scale.reshape(out_f, -1).t().contiguous().to(scale_dtype),
            zero.reshape(out_f, -1).t().contiguous().to(torch.int32))


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Float weight [out, in] from codes and per-group [groups, out] scale/zero; g_idx maps input column -> group.

    Contiguous whole groups (the common case) are worked in place on one float copy of the codes, with no
    gathered [out, in] scale and zero (the same operations, so the same values): a linear costs one float copy,
    not four."""
    out_f, in_f = q.shape
    groups = scale.shape[0]
    if in_f % groups == 0 and torch.equal(g_idx.cpu(), group_index(in_f, in_f // groups)):
        w = q.float().view(out_f, groups, in_f // groups)
        return w.sub_(zero.float().t()[:, :, None]).mul_(scale.float().t()[:, :, None]).view(out_f, in_f)
    s = scale.float()[g_idx.long()].t()
    z = zero.float()[g_idx.long()].t()
    return s * (q.float() - z)


def round_trip(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize (round to nearest) in float32: exactly what quantize_groups' codes dequantize to, computed
    on groups as rows with no code tensor or g_idx gather (SmolLM2's 210 linears at w4 g32 on 2 CPU cores: 1.2 s -> 0.28 s),
    since QAT runs it on every weight at every step and AWQ's searches at every grid point."""
    out_f, in_f = w.shape
    wg, scale, zero = _groups_as_rows(w, spec, torch.float16)
    return dequantize(quantize(wg, scale, zero, spec.maxq), scale, zero).reshape(out_f, -1)[:, :in_f]


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize in w's dtype with a straight-through gradient (Bengio et al. 2013; QAT).

    Scales are rounded to fp16 exactly as the checkpoint stores them, so conversion changes nothing."""
    wq = round_trip(w.detach(), spec).to(w.dtype)
    return w + (wq - w).detach()
