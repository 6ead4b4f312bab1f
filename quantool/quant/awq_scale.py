"""AWQ's activation-aware scale search (Lin et al. 2023, arXiv:2306.00978, Sec. 3.2 and Eq. 5), after
llm-awq's `auto_scale.py`: s = mean|x|^alpha (or duo: mean|x|^alpha / mean|w|^(1-alpha)) over a grid of
alpha, scaled weights quantized, the alpha minimizing the block-output MSE wins."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from quantool.quant.quantizer import QuantSpec, pad_to_groups, round_trip


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| per input channel over all tokens."""
    return x.reshape(-1, x.shape[-1]).abs().float().mean(dim=0)


def weight_scale(weights: Sequence[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Mean over output rows of |w| normalized by its group's max (llm-awq `get_weight_scale`)."""
    w = torch.cat([wi.float() for wi in weights], dim=0)
    g = spec.group_size_for(w.shape[1])
    wp = pad_to_groups(w.abs(), g)
    wg = wp.reshape(-1, g)
    wg = wg / wg.amax(dim=1, keepdim=True).clamp(min=1e-8)
    return wg.reshape(wp.shape)[:, : w.shape[1]].mean(dim=0)


def search_scale(x_mean: torch.Tensor, weights: Sequence[torch.Tensor], run: Callable[[list[torch.Tensor]], torch.Tensor],
                 reference: torch.Tensor, spec: QuantSpec, n_grid: int = 20, duo: bool = False) -> tuple[torch.Tensor, dict]:
    """Best per-input-channel scales s for the linears `weights` that share one input.

    run(ws) must return the block output when the linears use weights ws (and their input is divided by s,
    which the caller folds in by passing ws = Q(w * s) / s). reference is the full-precision output.
    Returns (s, {"alpha": best, "loss": best_loss, "loss_at_1": loss with s = 1}).
    """
    w_mean = weight_scale(weights, spec) if duo else None
    best: tuple[float, float, torch.Tensor | None] = (float("inf"), 0.0, None)
    losses = []
    for k in range(n_grid):
        alpha = k / n_grid
        s = x_mean.pow(alpha) / w_mean.pow(1 - alpha) if w_mean is not None else x_mean.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        ws = [round_trip(w.float() * s, spec) / s for w in weights]
        loss = float((run(ws).float() - reference.float()).pow(2).mean())
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    if best[2] is None:
        raise ValueError("every AWQ scale candidate gave a non-finite loss: the calibration outputs hold inf or NaN")
    return best[2], {"alpha": best[1], "loss": best[0], "loss_at_1": losses[0]}
