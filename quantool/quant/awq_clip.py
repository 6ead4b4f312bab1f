"""AWQ's weight clipping search (llm-awq `auto_clip.py`): per output row and group, shrink the clipping
range max|w| by up to 50% in 20 steps and keep the one minimizing the error of (x . w) per group."""

from __future__ import annotations

import torch

from quantool.quant.awq_scale import rtn
from quantool.quant.quantizer import QuantSpec


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512, row_batch: int = 256) -> torch.Tensor:
    """Best clipping value per (output row, group): tensor [out, groups]."""
    out_f, in_f = w.shape
    g = spec.groups_for(in_f)
    x = x.reshape(-1, in_f).float()
    x = x[:: max(1, x.shape[0] // n_tokens)]
    xg = x.reshape(1, x.shape[0], in_f // g, g)
    best_all = []
    for r in range(0, out_f, row_batch):
        wb = w[r:r + row_batch].float().reshape(-1, 1, in_f // g, g)
        org_max = wb.abs().amax(dim=-1, keepdim=True)
        ref = (xg * wb).sum(dim=-1)
        best_err = torch.full(org_max.shape[:1] + org_max.shape[2:3], float("inf"), device=w.device)
        best_max = org_max.clone()
        for k in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - k / n_grid)
            clipped = torch.maximum(torch.minimum(wb, max_val), -max_val)
            qw = rtn(clipped.reshape(-1, in_f), spec).reshape(wb.shape)
            err = ((xg * qw).sum(dim=-1) - ref).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[:, None, :, None], max_val, best_max)
        best_all.append(best_max.reshape(-1, in_f // g))
    return torch.cat(best_all)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    out_f, in_f = w.shape
    groups = max_val.shape[1]
    m = max_val[:, :, None].to(w.dtype)
    wg = w.reshape(out_f, groups, in_f // groups)
    return torch.maximum(torch.minimum(wg, m), -m).reshape(out_f, in_f)
