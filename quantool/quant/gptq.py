"""GPTQ (Frantar et al. 2022, arXiv:2210.17323), following IST-DASLab's reference `gptq.py`:
Cholesky form of the inverse Hessian (Sec. 3, Step 3), lazy batch updates in blocks of 128 (Step 2),
optional act-order (columns by decreasing Hessian diagonal) with or without static groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantool.quant.quantizer import QuantSpec, qparams, quantize


class Hessian:
    """Running H = 2/n * sum x x^T over calibration tokens (reference `add_batch`)."""

    def __init__(self, columns: int, device=None):
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        x = math.sqrt(2 / self.n) * x
        self.H += x.t() @ x


@dataclass
class GPTQResult:
    q: torch.Tensor  # int32 [out, in], original column order
    scale: torch.Tensor  # [groups, out]
    zero: torch.Tensor  # int32 [groups, out]
    g_idx: torch.Tensor  # int32 [in]: group of each input column
    weight: torch.Tensor  # dequantized float32 [out, in]
    damp: float  # damping fraction finally used
    loss: float  # sum of the GPTQ objective terms (w - q)^2 / d^2 / 2


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1, raising damping x10 until the factorization succeeds."""
    mean_diag = torch.mean(torch.diag(H))
    damp = percdamp
    while True:  # temporaries are dropped as soon as used: at most three [in, in] matrices live at once
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0:
                return U, damp
        if damp >= 10:
            raise RuntimeError("GPTQ: Hessian is not positive definite even with damping 10x its mean diagonal")
        damp *= 10


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False, scale_dtype=torch.float16) -> GPTQResult:
    """Quantize W [out, in] minimizing ||W X - Q X||^2 where H = 2 X X^T / n."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    rows, cols = W.shape
    g = spec.groups_for(cols)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    def params(block):
        scale, zero = qparams(block, spec)
        return scale.to(scale_dtype).float(), zero

    static = [params(W[:, i:i + g]) for i in range(0, cols, g)] if static_groups else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = _inverse_cholesky(H, percdamp)
    del H
    blocksize = max(blocksize, g)

    Q = torch.zeros_like(W)
    scales = torch.zeros(cols // g, rows, device=W.device)
    zeros = torch.zeros(cols // g, rows, device=W.device)
    g_idx = torch.zeros(cols, dtype=torch.int32, device=W.device)
    loss = 0.0
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col])
            group = orig // g if static_groups else col // g
            if static_groups:
                scale, zero = static[group]
            elif col % g == 0:
                scale, zero = params(W1[:, i:i + g])
            scales[group], zeros[group] = scale, zero
            g_idx[orig] = group
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize(w, scale, zero, spec.maxq)
            Q[:, col] = q
            wq = scale * (q - zero)
            loss += float(((w - wq) ** 2).sum() / d**2 / 2)
            err = (w - wq) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    q = Q[:, inv].to(torch.int32)
    zero_i = zeros.to(torch.int32)
    weight = scales[g_idx.long()].t() * (q.float() - zero_i[g_idx.long()].t().float())
    return GPTQResult(q, scales.to(scale_dtype), zero_i, g_idx, weight, damp, loss)
