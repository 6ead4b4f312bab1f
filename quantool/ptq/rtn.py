"""Round-to-nearest, group-wise: the baseline every calibrated method must beat. Needs no calibration data."""

from __future__ import annotations

from quantool.model.structure import LayerMap
from quantool.ptq.report import LayerReport, bias_of, relative_error, set_weight
from quantool.quant.quantizer import QuantizedWeight, QuantSpec, group_index, quantize_groups


def quantize_layer(layer, lmap: LayerMap, x, kwargs, spec: QuantSpec, cfg, device):
    results, report = {}, LayerReport()
    for name in lmap.linears:
        mod = layer.get_submodule(name)
        w = mod.weight.data.float()
        q, scale, zero = quantize_groups(w, spec)
        qw = QuantizedWeight(q.cpu(), scale.cpu(), zero.cpu(), group_index(w.shape[1], spec.group_size_for(w.shape[1])), bias_of(mod))
        wq = qw.dequantize()
        report.errors[name] = relative_error(w, wq, None)
        set_weight(mod, wq)
        del w, wq
        results[name] = qw
    return results, report, None
