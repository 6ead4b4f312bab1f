"""AWQ for one decoder layer, after llm-awq's `run_awq`: record the layer's inputs, search each foldable
pair's scales (`quant.awq_scale`) and fold them in, search clipping (`quant.awq_clip`), quantize.

The inputs are recorded once per input shared by several linears (q/k/v, gate/up), in fp32, for the
calibration tokens the pipeline passes (at most `awq_search_tokens`): that bounds AWQ's memory. The
layer's full-precision outputs feed the next layer, as in llm-awq.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from quantool.model.layerwise import record_call, record_inputs, run_layer
from quantool.model.structure import LayerMap, norm_offset
from quantool.ptq.report import LayerReport, bias_of, relative_error, set_weight
from quantool.quant.awq_clip import apply_clip, search_clip
from quantool.quant.awq_scale import activation_scale, search_scale
from quantool.quant.gptq import Hessian
from quantool.quant.quantizer import QuantizedWeight, QuantSpec, group_index, quantize_groups


def quantize_layer(layer, lmap: LayerMap, x, kwargs, spec: QuantSpec, cfg, device):
    report = LayerReport()
    linears = {n: layer.get_submodule(n) for n in lmap.linears}
    shared = {n: group[0] for group in lmap.groups for n in group}  # each linear's input is its group's first's
    inputs: dict[str, list] = {group[0]: [] for group in lmap.groups}
    calls = {p.inspect: {} for p in lmap.pairs}
    firsts = {g: linears[g] for g in inputs}
    with record_inputs(firsts, lambda n, inp: inputs[n].append(inp.detach())), ExitStack() as stack:
        for name, store in calls.items():
            stack.enter_context(record_call(layer.get_submodule(name), store))
        y = run_layer(layer, x, kwargs, device)  # full-precision outputs feed the next layer
    feats = {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).float() for n, v in inputs.items()}
    del inputs
    for pair in lmap.pairs:
        consumers = [linears[n] for n in pair.consumers]
        inspect = layer.get_submodule(pair.inspect)
        original = [c.weight.data.clone() for c in consumers]
        reference = _replay(inspect, calls[pair.inspect])
        x_in = feats[shared[pair.consumers[0]]]

        def run(ws, consumers=consumers, inspect=inspect, calls=calls[pair.inspect]):
            for c, w in zip(consumers, ws):
                set_weight(c, w)
            return _replay(inspect, calls)

        s, info = search_scale(activation_scale(x_in), original, run, reference, spec, duo=cfg.duo_scaling)
        for c, w in zip(consumers, original):
            set_weight(c, w.float() * s)
        _fold_into_producer(layer.get_submodule(pair.producer), s, x_in)
        feats[shared[pair.consumers[0]]] = x_in / s
        report.notes.append(f"{pair.producer}->{'/'.join(pair.consumers)}: alpha {info['alpha']:.2f}, "
                            f"loss {info['loss']:.3g} (s=1: {info['loss_at_1']:.3g})")
    results = {}
    for name, mod in linears.items():
        w = mod.weight.data.float()
        x_in = feats[shared[name]]
        if cfg.clip and name not in lmap.attention_qk:
            w = apply_clip(w, search_clip(w, x_in, spec), spec)
        q, scale, zero = quantize_groups(w, spec)
        qw = QuantizedWeight(q.cpu(), scale.cpu(), zero.cpu(), group_index(w.shape[1], spec.group_size_for(w.shape[1])), bias_of(mod))
        H = Hessian(w.shape[1], w.device)
        H.add(x_in[:: max(1, x_in.shape[0] // 4096)])
        wq = qw.dequantize().to(w.device)
        report.errors[name] = relative_error(mod.weight.data.float(), wq, H.H)
        set_weight(mod, wq)
        results[name] = qw
    return results, report, y


@torch.no_grad()
def _replay(module, store) -> torch.Tensor:
    outs = []
    for args, kwargs in store["calls"]:
        y = module(*args, **kwargs)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])


@torch.no_grad()
def _fold_into_producer(producer, s: torch.Tensor, x: torch.Tensor):
    """Divide the producer's output channels by s: a norm's weight (and bias), or a linear's rows."""
    if isinstance(producer, torch.nn.Linear):
        producer.weight.data.copy_((producer.weight.data.float() / s[:, None]).to(producer.weight.dtype))
    else:
        offset = norm_offset(producer, x[:4].to(producer.weight.dtype))
        producer.weight.data.copy_(((producer.weight.data.float() + offset) / s - offset).to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.data.copy_((producer.bias.data.float() / s).to(producer.bias.dtype))
