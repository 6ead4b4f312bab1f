"""Round-to-nearest, group-wise: the baseline every calibrated method must beat. Needs no calibration data."""

from __future__ import annotations

from quantool.model.structure import LayerMap
from quantool.ptq.layer_report import LayerReport, bias_of, relative_error, set_weight
from quantool.quant.quantizer import QuantizedWeight, QuantSpec


def quantize_layer(layer, lmap: LayerMap, x, kwargs, specs: dict[str, QuantSpec], cfg, device):
    results, report = {}, LayerReport()
    for name in lmap.linears:
        mod = lmap.unit(layer, name)
        w, spec = mod.weight.data.float(), specs[name]
        qw = QuantizedWeight.from_rtn(w, spec, bias_of(mod))
        wq = qw.dequantize()
        report.errors[name] = relative_error(w, wq, None)
        set_weight(mod, wq)
        del w, wq
        results[name] = qw
    return results, report, None
