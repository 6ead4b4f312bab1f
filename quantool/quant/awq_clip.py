"""AWQ's weight clipping search (llm-awq `auto_clip.py`): per output row and group, shrink the clipping
range max|w| by up to 50% in 20 steps and keep the one minimizing the error of (x . w) per group.

The objective is llm-awq's, mean over tokens of (x_g . (Q(w_g) - w_g))^2 per (row, group g), computed
as d^T G d with each group's Gram matrix G = X_g^T X_g / T. That equals the per-token sum exactly, costs
out * in * group per step instead of out * in * tokens, and so uses every token it is given where
llm-awq subsamples 512 of them to keep its [tokens, rows, groups] products in memory.
"""

from __future__ import annotations

import torch

from quantool.quant.quantizer import QuantSpec, pad_to_groups, round_trip


def group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups, g, g]: X_g^T X_g / T of each column group of the inputs x [..., in] (zero-padded at the end)."""
    x = pad_to_groups(x.reshape(-1, x.shape[-1]).float(), group_size)
    xg = x.reshape(x.shape[0], -1, group_size).transpose(0, 1)
    return xg.transpose(1, 2) @ xg / x.shape[0]


def group_output_error(d: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """[out, groups]: d_g^T G_g d_g for a weight difference d [out, groups * g] (mean squared output error)."""
    n, g, _ = gram.shape
    dg = d.reshape(d.shape[0], n, g).transpose(0, 1)
    return ((dg @ gram) * dg).sum(dim=-1).t()


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Best clipping value per (output row, group): tensor [out, groups]. A partial last group is padded with
    zero columns, which add nothing to either product."""
    out_f, in_f = w.shape
    g = spec.group_size_for(in_f)
    gram = group_gram(x, g)
    wp = pad_to_groups(w.float(), g)
    wb = wp.reshape(out_f, -1, g)
    org_max = wb.abs().amax(dim=-1, keepdim=True)
    best_err = torch.full(org_max.shape[:2], float("inf"), device=w.device)
    best_max = org_max.clone()
    for k in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - k / n_grid)
        clipped = torch.maximum(torch.minimum(wb, max_val), -max_val).reshape(out_f, -1)
        qw = pad_to_groups(round_trip(clipped[:, :in_f], spec), g)
        err = group_output_error(qw - wp, gram)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better[:, :, None], max_val, best_max)
    return best_max.reshape(out_f, -1)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Clip each (row, group) of w to +-max_val [out, groups]."""
    out_f, in_f = w.shape
    g = spec.group_size_for(in_f)
    m = max_val[:, :, None].to(w.dtype)
    wg = pad_to_groups(w, g).reshape(out_f, max_val.shape[1], g)
    return torch.maximum(torch.minimum(wg, m), -m).reshape(out_f, -1)[:, :in_f]
