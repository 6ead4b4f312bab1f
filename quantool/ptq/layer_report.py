"""What each quantized layer reports: seconds, the relative output error of each linear, notes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LayerReport:
    index: int = 0
    seconds: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)  # relative output error per linear
    notes: list[str] = field(default_factory=list)
    expert_tokens: dict[str, int] = field(default_factory=dict)  # tokens each expert matrix received (MoE, calibrated)
    refine: dict[str, Any] = field(default_factory=dict)  # --refine: output error before and after, and whether kept


def relative_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor | None, rows: int = 1024) -> float:
    """||(W - Q) X|| / ||W X|| through the Hessian (tr(D H D^T)), or the weight error without calibration.

    Summed in float64 over blocks of rows, so no float64 copy of a weight is made. Through the Hessian, a
    weight taller than `rows` is measured on `rows` evenly spaced rows (an estimate: the exact sum costs two
    [out, in] x [in, in] products, as much as GPTQ itself)."""
    if H is not None and w.shape[0] > rows:
        pick = torch.linspace(0, w.shape[0] - 1, rows, device=w.device).round().long()
        w, wq = w[pick], wq[pick]
    err = ref = 0.0
    for i in range(0, w.shape[0], rows):
        wb = w[i : i + rows].float()
        d = wb - wq[i : i + rows].to(wb)
        if H is None:
            err += float(d.double().square().sum())
            ref += float(wb.double().square().sum())
        else:
            Hf = H.to(wb)
            err += float(((d @ Hf) * d).double().sum())
            ref += float(((wb @ Hf) * wb).double().sum())
    return (max(err, 0.0) / max(ref, 1e-30)) ** 0.5


def set_weight(module: Any, w: torch.Tensor) -> None:
    """Replace a linear's weight values in place (its dtype and device stay; a view writes through)."""
    module.weight.data.copy_(w.to(module.weight.dtype))


def bias_of(module: Any) -> torch.Tensor | None:
    return module.bias.detach().to("cpu", torch.float16) if module.bias is not None else None
