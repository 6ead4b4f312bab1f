"""GPTQ for one decoder layer (reference `llama_sequential`): Hessians from the layer's real inputs, one per
input shared by several linears, quantized group after group (true-sequential) so each sees the linears
quantized before it, then the layer's outputs from the quantized weights feed the next layer."""

from __future__ import annotations

from quantool.errors import QuantoolError
from quantool.model.layerwise import collect_inputs, run_layer
from quantool.model.structure import LayerMap
from quantool.ptq.report import LayerReport, bias_of, relative_error, set_weight
from quantool.quant.gptq import CholeskyError, Hessian, gptq_quantize
from quantool.quant.quantizer import QuantizedWeight, QuantSpec


def quantize_layer(layer, lmap: LayerMap, x, kwargs, spec: QuantSpec, cfg, device):
    results, report = {}, LayerReport()
    stages = [[group] for group in lmap.groups] if cfg.true_sequential else [lmap.groups]
    for stage in stages:
        first = {group[0]: layer.get_submodule(group[0]) for group in stage}
        hessians = {n: Hessian(m.in_features, device) for n, m in first.items()}
        collect_inputs(layer, x, kwargs, device, first, lambda n, inp: hessians[n].add(inp))
        for group in stage:
            H = hessians[group[0]].H
            for name in group:
                mod = layer.get_submodule(name)
                try:
                    res = gptq_quantize(mod.weight.data, H, spec, percdamp=cfg.damp, order=cfg.order, static_groups=cfg.static_groups)
                except CholeskyError as exc:
                    raise QuantoolError(f"GPTQ failed on {name}: {exc}; try more --nsamples or another --calib text") from None
                if res.damp != cfg.damp:
                    report.notes.append(f"{name}: Cholesky failed at damp {cfg.damp:g}, used {res.damp:g}")
                report.errors[name] = relative_error(mod.weight.data.float(), res.weight, H)
                set_weight(mod, res.weight)
                results[name] = QuantizedWeight(res.q.cpu(), res.scale.cpu(), res.zero.cpu(), res.g_idx.cpu(), bias_of(mod))
    return results, report, run_layer(layer, x, kwargs, device)
