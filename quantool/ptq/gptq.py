"""GPTQ for one decoder layer (reference `llama_sequential`): Hessians from the layer's real inputs, one per
input shared by several linears, quantized group after group (true-sequential) so each sees the linears
quantized before it, then the layer's outputs from the quantized weights feed the next layer. A stage whose
linears sit in a submodule that the previous stage's linears also sit in (down_proj in the MLP, after
gate/up) recomputes its inputs from that submodule's recorded inputs, not from the layer's start."""

from __future__ import annotations

from contextlib import nullcontext

from quantool.errors import QuantoolError
from quantool.model.layerwise import collect_inputs, enclosing, record_call, run_layer
from quantool.model.structure import LayerMap
from quantool.ptq.report import LayerReport, bias_of, relative_error, set_weight
from quantool.quant.gptq import CholeskyError, Hessian, gptq_quantize
from quantool.quant.quantizer import QuantizedWeight, QuantSpec


def quantize_layer(layer, lmap: LayerMap, x, kwargs, spec: QuantSpec, cfg, device):
    results, report = {}, LayerReport()
    stages = [[group] for group in lmap.groups] if cfg.true_sequential else [lmap.groups]
    start = None
    for k, stage in enumerate(stages):
        first = {group[0]: layer.get_submodule(group[0]) for group in stage}
        hessians = {n: Hessian(m.in_features, device) for n, m in first.items()}
        entry = _next_entry(stage, stages[k + 1] if k + 1 < len(stages) else None)
        calls = {}
        with record_call(layer.get_submodule(entry), calls, "cpu") if entry else nullcontext():
            collect_inputs(layer, x, kwargs, device, first, lambda n, inp: hessians[n].add(inp), start=start)
        start = (layer.get_submodule(entry), calls["calls"]) if calls.get("calls") else None
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


def _next_entry(stage: list[list[str]], following: list[list[str]] | None) -> str:
    """The submodule from which the following stage's inputs can be recomputed: the innermost one enclosing
    that stage's linears, provided this stage's linears lie inside it too (so quantizing them cannot change
    its input). Its inputs are recorded during this stage's pass, and the next pass runs it alone: the MLP's
    down_proj stage then skips attention. '' when there is none."""
    if not following:
        return ""
    entry = enclosing([n for group in following for n in group])
    return entry if entry and all(n.startswith(entry + ".") for group in stage for n in group) else ""
