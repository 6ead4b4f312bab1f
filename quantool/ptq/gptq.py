"""GPTQ for one decoder layer (reference `llama_sequential`): Hessians from the layer's real inputs, one per
input shared by several linears, quantized stage after stage (true-sequential) so each sees the linears
quantized before it, then the layer's outputs from the quantized weights feed the next layer. A stage whose
linears sit in a submodule that the previous stage's linears also sit in (down_proj in the MLP, after
gate/up) recomputes its inputs from that submodule's recorded inputs, not from the layer's start.

Mixture-of-experts: all experts' matrices of one fused parameter form one stage, each expert with its own
Hessian built from the tokens its router sent to it (`experts.record_expert_inputs`), in batches of experts
whose Hessians fit `--expert-batch-bytes` (each batch one more pass over the block). An expert matrix that
received fewer tokens than `--expert-token-ratio` times its input width is rounded to nearest instead."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from quantool.errors import QuantoolError
from quantool.model.experts import record_expert_inputs
from quantool.model.layerwise import collect_inputs, record_call, record_outputs, run_layer
from quantool.model.structure import LayerMap, common_prefix
from quantool.ptq.config import PTQConfig
from quantool.ptq.layer_report import LayerReport, bias_of, relative_error, set_weight
from quantool.quant.gptq import CholeskyError, Hessian, gptq_quantize
from quantool.quant.quantizer import QuantizedWeight, QuantSpec


def _stages(lmap: LayerMap, cfg: PTQConfig) -> list[list[list[str]]]:
    """True-sequential stages: each group of linears sharing an input is one, except that the experts of one fused
    parameter (independent of each other) form one stage together."""
    if not cfg.true_sequential:
        return [lmap.groups]
    stages: list[list[list[str]]] = []
    for group in lmap.groups:
        spec = lmap.expert_of(group[0])
        if spec is not None and stages and lmap.expert_of(stages[-1][0][0]) == spec:
            stages[-1].append(group)
        else:
            stages.append([group])
    return stages


def _batches(stage: list[list[str]], widths: dict[str, int], budget: int) -> list[list[list[str]]]:
    """The stage's groups in batches whose fp32 Hessians fit `budget` bytes (a batch holds at least one group)."""
    batches: list[list[list[str]]] = [[]]
    used = 0
    for group in stage:
        size = 4 * widths[group[0]] ** 2
        if batches[-1] and used + size > budget:
            batches.append([])
            used = 0
        batches[-1].append(group)
        used += size
    return batches


def collect_hessians(layer: nn.Module, lmap: LayerMap, groups: list[list[str]], x: torch.Tensor, kwargs: dict, device: torch.device,
                     tokens: int, start: tuple[nn.Module, list] | None = None) -> dict[str, Hessian]:
    """GPTQ's Hessian of each group of linears sharing an input (keyed by its first), from one pass over the layer's
    inputs x (from `start`'s recorded calls, when given); an expert's from the tokens its router sends it."""
    hessians = {g[0]: Hessian(lmap.unit(layer, g[0]).in_features, device) for g in groups}
    modules = {n: layer.get_submodule(n) for n in hessians if lmap.expert_of(n) is None}
    experts = set(hessians) - set(modules)

    def add(name: str, inp: torch.Tensor) -> None:
        hessians[name].add(inp)

    around = (lambda: record_expert_inputs(layer, lmap.experts, experts, add)) if experts else None
    collect_inputs(layer, x, kwargs, device, modules, add, tokens, start=start, around=around)
    return hessians


def quantize_layer(layer: nn.Module, lmap: LayerMap, x: torch.Tensor, kwargs: dict, specs: dict[str, QuantSpec], cfg: PTQConfig,
                   device: torch.device, rounded: dict | None = None) -> tuple[dict[str, QuantizedWeight], LayerReport, torch.Tensor]:
    """`rounded`, when given, receives each linear's weight before GPTQ (for --refine)."""
    if rounded is not None:
        rounded.update({n: lmap.unit(layer, n).weight.data.float().clone() for n in lmap.linears if lmap.expert_of(n) is None})
    results: dict[str, QuantizedWeight] = {}
    report = LayerReport()
    stages = _stages(lmap, cfg)
    start: tuple[nn.Module, list] | None = None
    memo: dict[nn.Module, Any] = {}
    for k, stage in enumerate(stages):
        units = {group[0]: lmap.unit(layer, group[0]) for group in stage}
        entry = _next_entry(lmap, stage, stages[k + 1] if k + 1 < len(stages) else None)
        stage_start = start
        for b, batch in enumerate(_batches(stage, {n: u.in_features for n, u in units.items()}, cfg.expert_batch_bytes)):
            calls: dict = {}
            finished = [] if stage_start else [m for m in _finished_children(layer, lmap, results) if m not in memo]
            with record_call(layer.get_submodule(entry), calls, "cpu") if entry and b == 0 else nullcontext(), \
                    record_outputs(finished, memo):
                hessians = collect_hessians(layer, lmap, batch, x, kwargs, device, cfg.chunk_tokens, start=stage_start)
            if b == 0:
                start = (layer.get_submodule(entry), calls["calls"]) if calls.get("calls") else None
            for group in batch:
                for same in _by_spec(group, specs):  # linears of one input at other widths (quantool fit) apart
                    _quantize_group(layer, lmap, same, hessians[group[0]], specs[same[0]], cfg, results, report)
            del hessians
    start = None  # the recorded calls go before the last pass, whose replayed outputs take their place
    _note_experts(lmap, report)
    return results, report, run_layer(layer, x, kwargs, device, cfg.chunk_tokens, replay=memo)


def _by_spec(group: list[str], specs: dict[str, QuantSpec]) -> list[list[str]]:
    """The group's linears in runs of one quantizer, first appearance first: one stacked GPTQ problem each."""
    runs: dict[QuantSpec, list[str]] = {}
    for name in group:
        runs.setdefault(specs[name], []).append(name)
    return list(runs.values())


def _finished_children(layer: nn.Module, lmap: LayerMap, quantized: dict) -> list[nn.Module]:
    """The layer's direct submodules whose linears are all quantized already. Stages run in execution order, so
    their inputs are final too: their outputs in the next full pass are their outputs in the last one (the
    attention block, once o_proj is done, need not run again to give the layer's outputs)."""
    inside: dict[str, list[str]] = {}
    for name in lmap.linears:
        if "." in name:
            inside.setdefault(name.split(".", 1)[0], []).append(name)
    return [layer.get_submodule(c) for c, names in inside.items() if all(n in quantized for n in names)]


def _quantize_group(layer: nn.Module, lmap: LayerMap, group: list[str], hessian: Hessian, spec: QuantSpec, cfg: PTQConfig,
                    results: dict, report: LayerReport) -> None:
    """The linears sharing one input as one matrix, their rows stacked: GPTQ treats rows independently given
    the shared H^-1 and each row's own group ranges, so this is quantizing them one by one (up to rounding in
    the block products), with one column loop instead of one per linear. An expert matrix that saw too few
    tokens is rounded to nearest."""
    mods = [lmap.unit(layer, name) for name in group]
    if lmap.expert_of(group[0]) is not None:
        report.expert_tokens[group[0]] = hessian.n
        if hessian.n < cfg.expert_token_ratio * mods[0].in_features:
            w = mods[0].weight.data.float()
            qw = QuantizedWeight.from_rtn(w, spec, None)
            wq = qw.dequantize().to(w.device)
            report.errors[group[0]] = relative_error(w, wq, None)
            set_weight(mods[0], wq)
            results[group[0]] = qw
            return
    H = hessian.H
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


def _note_experts(lmap: LayerMap, report: LayerReport) -> None:
    """One line per fused parameter: tokens its experts received, and how many were rounded to nearest."""
    for spec in lmap.experts:
        counts = [report.expert_tokens[spec.unit(e)] for e in range(spec.experts) if spec.unit(e) in report.expert_tokens]
        if counts:
            counts.sort()
            report.notes.append(f"{spec.param}: {len(counts)} experts, tokens per expert min {counts[0]}, median "
                                f"{counts[len(counts) // 2]}, max {counts[-1]}")


def _next_entry(lmap: LayerMap, stage: list[list[str]], following: list[list[str]] | None) -> str:
    """The submodule from which the following stage's inputs can be recomputed: the innermost one enclosing
    that stage's linears (for experts, the module owning their fused parameter), provided this stage's linears
    lie inside it too (so quantizing them cannot change its input). Its inputs are recorded during this stage's
    pass, and the next pass runs it alone: the MLP's down_proj stage then skips attention. '' when there is none."""
    if not following:
        return ""
    names = [n for group in following for n in group]
    modules = sorted({lmap.module_of(n) for n in names})
    if all(lmap.expert_of(n) is not None for n in names):
        entry = common_prefix(modules)
    else:
        entry = common_prefix([m.rsplit(".", 1)[0] if "." in m else "" for m in modules])
    inside = all(lmap.module_of(n) == entry or lmap.module_of(n).startswith(entry + ".") for group in stage for n in group)
    return entry if entry and inside else ""
