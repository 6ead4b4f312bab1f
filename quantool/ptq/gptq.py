"""GPTQ for one decoder layer (reference `llama_sequential`): Hessians from the layer's real inputs, one per
input shared by several linears, quantized group after group (true-sequential) so each sees the linears
quantized before it, then the layer's outputs from the quantized weights feed the next layer. A stage whose
linears sit in a submodule that the previous stage's linears also sit in (down_proj in the MLP, after
gate/up) recomputes its inputs from that submodule's recorded inputs, not from the layer's start."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from quantool.errors import QuantoolError
from quantool.model.layerwise import collect_inputs, enclosing, record_call, record_outputs, run_layer
from quantool.model.structure import LayerMap
from quantool.ptq.report import LayerReport, bias_of, relative_error, set_weight
from quantool.quant.gptq import CholeskyError, Hessian, gptq_quantize
from quantool.quant.quantizer import QuantizedWeight, QuantSpec


def quantize_layer(layer, lmap: LayerMap, x, kwargs, spec: QuantSpec, cfg, device):
    results, report = {}, LayerReport()
    stages = [[group] for group in lmap.groups] if cfg.true_sequential else [lmap.groups]
    start, memo = None, {}
    for k, stage in enumerate(stages):
        first = {group[0]: layer.get_submodule(group[0]) for group in stage}
        hessians = {n: Hessian(m.in_features, device) for n, m in first.items()}
        entry = _next_entry(stage, stages[k + 1] if k + 1 < len(stages) else None)
        calls = {}
        finished = [] if start else [m for m in _finished_children(layer, lmap, results) if m not in memo]
        with record_call(layer.get_submodule(entry), calls, "cpu") if entry else nullcontext(), \
                record_outputs(finished, memo):
            collect_inputs(layer, x, kwargs, device, first, lambda n, inp: hessians[n].add(inp), start=start)
        start = (layer.get_submodule(entry), calls["calls"]) if calls.get("calls") else None
        for group in stage:
            _quantize_group(layer, group, hessians[group[0]].H, spec, cfg, results, report)
    start = calls = None  # the recorded calls go before the last pass, whose replayed outputs take their place
    return results, report, run_layer(layer, x, kwargs, device, replay=memo)


def _finished_children(layer, lmap: LayerMap, quantized) -> list:
    """The layer's direct submodules whose linears are all quantized already. Stages run in execution order, so
    their inputs are final too: their outputs in the next full pass are their outputs in the last one (the
    attention block, once o_proj is done, need not run again to give the layer's outputs)."""
    inside: dict[str, list[str]] = {}
    for name in lmap.linears:
        if "." in name:
            inside.setdefault(name.split(".", 1)[0], []).append(name)
    return [layer.get_submodule(c) for c, names in inside.items() if all(n in quantized for n in names)]


def _quantize_group(layer, group: list[str], H, spec: QuantSpec, cfg, results: dict, report: LayerReport):
    """The linears sharing one input as one matrix, their rows stacked: GPTQ treats rows independently given
    the shared H^-1 and each row's own group ranges, so this is quantizing them one by one (up to rounding in
    the block products), with one column loop instead of one per linear."""
    mods = [layer.get_submodule(name) for name in group]
    W = torch.cat([m.weight.data for m in mods]) if len(mods) > 1 else mods[0].weight.data
    try:
        res = gptq_quantize(W, H, spec, percdamp=cfg.damp, order=cfg.order, static_groups=cfg.static_groups)
    except CholeskyError as exc:
        raise QuantoolError(f"GPTQ failed on {', '.join(group)}: {exc}; try more --nsamples or another --calib text") from None
    if res.damp != cfg.damp:
        report.notes.append(f"{', '.join(group)}: Cholesky failed at damp {cfg.damp:g}, used {res.damp:g}")
    rows = [m.out_features for m in mods]
    for name, mod, q, w, scale, zero in zip(group, mods, res.q.split(rows), res.weight.split(rows),
                                            res.scale.split(rows, dim=1), res.zero.split(rows, dim=1)):
        report.errors[name] = relative_error(mod.weight.data.float(), w, H)
        set_weight(mod, w)
        results[name] = QuantizedWeight(q.cpu(), scale.cpu().contiguous(), zero.cpu().contiguous(), res.g_idx.cpu(), bias_of(mod))


def _next_entry(stage: list[list[str]], following: list[list[str]] | None) -> str:
    """The submodule from which the following stage's inputs can be recomputed: the innermost one enclosing
    that stage's linears, provided this stage's linears lie inside it too (so quantizing them cannot change
    its input). Its inputs are recorded during this stage's pass, and the next pass runs it alone: the MLP's
    down_proj stage then skips attention. '' when there is none."""
    if not following:
        return ""
    entry = enclosing([n for group in following for n in group])
    return entry if entry and all(n.startswith(entry + ".") for group in stage for n in group) else ""
