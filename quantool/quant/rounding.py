"""Learned rounding of one quantized linear, after SignRound (Cheng et al. 2023, arXiv 2309.05516, eq. 2-4).

The codes are clamp(round(W / (s m) + v) + v0 + z, 0, maxq): v in [-0.5, 0.5] is a learned rounding offset per
weight and m a learned multiplier of each group's scale, both trained by signed gradient descent through a
straight-through round (Bengio et al. 2013; one fused autograd function, `_FakeQuant`), so that a block's output
matches the full-precision block's. It starts from a method's codes (RTN, GPTQ, AWQ): v0 = (q - z) - round(W / s),
an integer, moves each weight to the method's code and keeps its fractional position, so, as in SignRound, the
weights closest to a rounding boundary are the first to change (for round to nearest v0 = 0). Scales are rounded to
fp16 in the forward pass, as the checkpoint stores them.
"""

from __future__ import annotations

import torch
from torch import nn

from quantool.quant.quantizer import QuantizedWeight

SCALE_RANGE = (0.5, 1.5)  # the learned multiplier of each group's scale stays in this range


class _FakeQuant(torch.autograd.Function):
    """s * (clamp(round(w / s + v) + v0 + z, 0, maxq) - z) with a straight-through round, in one pass: the same values
    and gradients as autograd through those operations (up to float order in s's), without its per-operation
    temporaries. s broadcasts against w ([out, groups, 1] against [out, groups, group], or [out, in])."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, v: torch.Tensor, s: torch.Tensor, v0: torch.Tensor, zero: torch.Tensor,
                maxq: int) -> torch.Tensor:
        cz, inside = _centred_codes(w, v, s, v0, zero, maxq)
        ctx.save_for_backward(w, s, cz, inside)
        return cz * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, s, cz, inside = ctx.saved_tensors
        g_in = grad * inside  # through the clamp (inclusive bounds, as torch.clamp's gradient) and the rounding
        grad_v = g_in * s
        # d out / d s = (c - z) + s * dc/du * du/ds, with du/ds = -w / s^2
        grad_s = (grad * cz).sub_(g_in.mul_(w).div_(s)).sum_to_size(s.shape)
        return None, grad_v, grad_s, None, None, None


def _centred_codes(w: torch.Tensor, v: torch.Tensor, s: torch.Tensor, v0: torch.Tensor, zero: torch.Tensor, maxq: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes less the zero point, and where the clamp left them unchanged."""
    # v0 is added after rounding: inside, an integer shift would flip round-half-to-even at ties (a group's
    # extreme weight sits at exactly +-maxq/2 steps in symmetric min-max RTN) and move that code by one
    c = torch.div(w, s).add_(v).round_().add_(v0).add_(zero)
    inside = (c >= 0) & (c <= maxq)
    return c.clamp_(0, maxq).sub_(zero), inside


class LearnedRounding(nn.Module):
    """The trainable rounding of W [out, in] around a method's quantized weight `qw` (same grid, any g_idx)."""

    w: torch.Tensor
    g_idx: torch.Tensor
    scale0: torch.Tensor
    zero: torch.Tensor
    v0: torch.Tensor

    def __init__(self, w: torch.Tensor, qw: QuantizedWeight, maxq: int):
        super().__init__()
        device = w.device
        self.maxq = maxq
        self.register_buffer("w", w.float())
        self.register_buffer("g_idx", qw.g_idx.long().to(device))
        self.register_buffer("scale0", qw.scale.float().to(device))  # [groups, out]
        self.group = qw.group_size if qw.group_size > 0 else w.shape[1]
        self.contiguous = torch.equal(qw.g_idx.long().cpu(), torch.arange(w.shape[1]) // self.group)  # else act-order's
        self.grouped = self.contiguous and w.shape[1] % self.group == 0  # whole groups: worked as [out, groups, group]
        self.register_buffer("zero", self._per_weight(qw.zero.float().to(device)))  # [out, in]
        self.register_buffer("v0", qw.q.float().to(device) - self.zero - torch.round(self.w / self._per_weight(self.scale0)))
        self.v = nn.Parameter(torch.zeros_like(self.w))
        self.m = nn.Parameter(torch.ones_like(self.scale0))
        self.stored = qw  # its zeros, g_idx and bias are kept as they are

    def _per_weight(self, t: torch.Tensor) -> torch.Tensor:
        """A per-group tensor [groups, out] expanded to each weight [out, in]. Contiguous groups (all but act-order's)
        repeat each group's value, whose backward sums over the group: forward and backward of a 1536 x 576 matrix in
        groups of 64 take 5 ms on a CPU core, the gather by g_idx 16 ms."""
        if self.contiguous:
            return t.t().repeat_interleave(self.group, dim=1)[:, :self.w.shape[1]]
        return t.index_select(0, self.g_idx).t()

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], -1, self.group) if self.grouped else t

    def _scale(self, m: torch.Tensor) -> torch.Tensor:
        """The scales times m, rounded to fp16 (straight through), broadcastable against `_view`'s weights: [out,
        groups, 1] for whole groups (no per-weight copy), else each weight's [out, in]."""
        s = self.scale0 * m
        s = s + (s.half().float() - s).detach()
        return s.t().unsqueeze(-1) if self.grouped else self._per_weight(s)

    def _args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._view(self.w), self._view(self.v), self._scale(self.m), self._view(self.v0), self._view(self.zero)

    def codes(self) -> torch.Tensor:
        with torch.no_grad():
            cz = _centred_codes(*self._args(), self.maxq)[0]
        return cz.view_as(self.w) + self.zero

    def forward(self) -> torch.Tensor:
        """The dequantized weight [out, in], differentiable in v and m."""
        return _FakeQuant.apply(*self._args(), self.maxq).view_as(self.w)

    @torch.no_grad()
    def sign_step(self, lr: float) -> None:
        """Signed gradient descent (SignRound's optimizer), then each parameter back into its range."""
        for p, (lo, hi) in ((self.v, (-0.5, 0.5)), (self.m, SCALE_RANGE)):
            if p.grad is not None:
                p.sub_(p.grad.sign_(), alpha=lr).clamp_(lo, hi)
                p.grad = None

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned offsets and multipliers, copied (AutoRound keeps the best step's)."""
        return self.v.detach().clone(), self.m.detach().clone()

    @torch.no_grad()
    def save(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Copy the offsets and multipliers into a snapshot's buffers (no allocation inside the step loop)."""
        state[0].copy_(self.v)
        state[1].copy_(self.m)

    @torch.no_grad()
    def restore(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.v.copy_(state[0])
        self.m.copy_(state[1])

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """The learned codes and scales as stored: they dequantize to exactly forward()'s weight."""
        q = self.stored
        return QuantizedWeight(self.codes().cpu(), (self.scale0 * self.m).half().cpu(), q.zero, q.g_idx, q.bias)
