"""What each quantized layer reports: seconds, the relative output error of each linear, notes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerReport:
    index: int = 0
    seconds: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)  # relative output error per linear
    notes: list[str] = field(default_factory=list)


def relative_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor | None) -> float:
    """||(W - Q) X|| / ||W X|| through the Hessian (tr(D H D^T)), or the weight error without calibration."""
    d = (w - wq).double()
    if H is None:
        return float(d.norm() / w.double().norm().clamp(min=1e-30))
    H = H.double()
    return float(((d @ H) * d).sum().clamp(min=0).sqrt() / ((w.double() @ H) * w.double()).sum().clamp(min=1e-30).sqrt())


def set_weight(module: torch.nn.Linear, w: torch.Tensor):
    """Replace a linear's weight values in place (its dtype and device stay)."""
    module.weight.data.copy_(w.to(module.weight.dtype))


def bias_of(module: torch.nn.Linear) -> torch.Tensor | None:
    return module.bias.detach().to("cpu", torch.float16) if module.bias is not None else None
