"""AWQ's weight clipping search (llm-awq `auto_clip.py`): per output row and group, shrink the clipping
range max|w| by up to 50% in 20 steps and keep the one minimizing the error of (x . w) per group."""

from __future__ import annotations

import torch

from quantool.quant.quantizer import QuantSpec, pad_to_groups, round_trip


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512, row_batch: int = 256) -> torch.Tensor:
    """Best clipping value per (output row, group): tensor [out, groups]. A partial last group is padded with
    zero columns, which add nothing to either product."""
    out_f, in_f = w.shape
    g = spec.group_size_for(in_f)
    x = x.reshape(-1, in_f).float()
    x = pad_to_groups(x[:: max(1, x.shape[0] // n_tokens)], g)
    n = x.shape[1] // g
    xg = x.reshape(1, x.shape[0], n, g)
    wp = pad_to_groups(w.float(), g)
    best_all = []
    for r in range(0, out_f, row_batch):
        wb = wp[r:r + row_batch].reshape(-1, 1, n, g)
        org_max = wb.abs().amax(dim=-1, keepdim=True)
        ref = (xg * wb).sum(dim=-1)
        best_err = torch.full(org_max.shape[:1] + org_max.shape[2:3], float("inf"), device=w.device)
        best_max = org_max.clone()
        for k in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - k / n_grid)
            clipped = torch.maximum(torch.minimum(wb, max_val), -max_val)
            qw = pad_to_groups(round_trip(clipped.reshape(-1, n * g)[:, :in_f], spec), g).reshape(wb.shape)
            err = ((xg * qw).sum(dim=-1) - ref).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[:, None, :, None], max_val, best_max)
        best_all.append(best_max.reshape(-1, n))
    return torch.cat(best_all)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Clip each (row, group) of w to +-max_val [out, groups]."""
    out_f, in_f = w.shape
    g = spec.group_size_for(in_f)
    m = max_val[:, :, None].to(w.dtype)
    wg = pad_to_groups(w, g).reshape(out_f, max_val.shape[1], g)
    return torch.maximum(torch.minimum(wg, m), -m).reshape(out_f, -1)[:, :in_f]
