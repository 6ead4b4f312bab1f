"""Round-to-nearest, group-wise: the baseline every calibrated method must beat. Needs no calibration data."""

from __future__ import annotations

import torch
from torch import nn

from quantool.model.structure import LayerMap
from quantool.ptq.config import PTQConfig
from quantool.ptq.layer_report import LayerReport, bias_of, relative_error, set_weight
from quantool.quant.quantizer import QuantizedWeight, QuantSpec


def quantize_layer(layer: nn.Module, lmap: LayerMap, x: torch.Tensor | None, kwargs: dict | None, specs: dict[str, QuantSpec],
                   cfg: PTQConfig, device: torch.device, rounded: dict | None = None) -> tuple[dict[str, QuantizedWeight], LayerReport, None]:
    """`rounded`, when given, receives each linear's weight as rounded (for --refine)."""
    results, report = {}, LayerReport()
    for name in lmap.linears:
        mod = lmap.unit(layer, name)
        w, spec = mod.weight.data.float(), specs[name]
        qw = QuantizedWeight.from_rtn(w, spec, bias_of(mod))
        if rounded is not None:
            rounded[name] = w.clone()
        wq = qw.dequantize()
        report.errors[name] = relative_error(w, wq, None)
        set_weight(mod, wq)
        del w, wq
        results[name] = qw
    return results, report, None
