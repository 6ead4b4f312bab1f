"""AWQ for one decoder layer, after llm-awq's `run_awq`: record the layer's inputs, search each foldable
pair's scales (`quant.awq_scale`) and fold them in, search clipping (`quant.awq_clip`), quantize.

The inputs are recorded once per input shared by several linears (q/k/v, gate/up), in fp32, for the
calibration tokens the pipeline passes (at most `awq_search_tokens`): that bounds AWQ's memory. The
layer's full-precision outputs feed the next layer, as in llm-awq.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from quantool.model.experts import record_expert_inputs
from quantool.model.layerwise import record_call, record_inputs, run_layer
from quantool.model.structure import LayerMap, is_linear, norm_offset
from quantool.ptq.config import PTQConfig
from quantool.ptq.layer_report import LayerReport, bias_of, relative_error, set_weight
from quantool.quant.awq_clip import apply_clip, search_clip
from quantool.quant.awq_scale import activation_scale, search_scale
from quantool.quant.gptq import Hessian
from quantool.quant.quantizer import QuantizedWeight, QuantSpec


def quantize_layer(layer: torch.nn.Module, lmap: LayerMap, x: torch.Tensor, kwargs: dict, specs: dict[str, QuantSpec],
                   cfg: PTQConfig, device: torch.device, rounded: dict | None = None
                   ) -> tuple[dict[str, QuantizedWeight], LayerReport, torch.Tensor]:
    """`rounded`, when given, receives each linear's weight as rounded: scaled and clipped (for --refine)."""
    report = LayerReport()
    linears = {n: lmap.unit(layer, n) for n in lmap.linears}
    shared = {n: group[0] for group in lmap.groups for n in group}  # each linear's input is its group's first's
    inputs: dict[str, list] = {group[0]: [] for group in lmap.groups}
    calls: dict[str, dict] = {p.inspect: {} for p in lmap.pairs}
    modules = {g: layer.get_submodule(g) for g in inputs if lmap.expert_of(g) is None}
    experts = set(inputs) - set(modules)

    def keep(name: str, inp: torch.Tensor, store: dict[str, list] = inputs) -> None:
        store[name].append(inp.detach())

    with record_inputs(modules, keep), record_expert_inputs(layer, lmap.experts, experts, keep), ExitStack() as stack:
        for name, store in calls.items():
            stack.enter_context(record_call(layer.get_submodule(name), store))
        y = run_layer(layer, x, kwargs, device, cfg.chunk_tokens)  # full-precision outputs feed the next layer
    feats = {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).float() if v else
             torch.zeros(0, linears[n].in_features, device=device) for n, v in inputs.items()}
    inputs.clear()
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

        s, info = search_scale(activation_scale(x_in), original, run, reference, specs[pair.consumers[0]], duo=cfg.duo_scaling)
        for c, w in zip(consumers, original):
            set_weight(c, w.float() * s)
        _fold_into_producer(layer.get_submodule(pair.producer), s, x_in)
        feats[shared[pair.consumers[0]]] = x_in / s
        report.notes.append(f"{pair.producer}->{'/'.join(pair.consumers)}: alpha {info['alpha']:.2f}, "
                            f"loss {info['loss']:.3g} (s=1: {info['loss_at_1']:.3g})")
    results = {}
    for name, mod in linears.items():
        w, spec = mod.weight.data.float(), specs[name]
        x_in = feats[shared[name]]
        enough = lmap.expert_of(name) is None or x_in.shape[0] >= cfg.expert_token_ratio * w.shape[1]
        if lmap.expert_of(name) is not None:
            report.expert_tokens[name] = x_in.shape[0]
        if cfg.clip and name not in lmap.attention_qk and enough:  # an expert that saw too few tokens: plain rounding
            w = apply_clip(w, search_clip(w, x_in, spec), spec)
        qw = QuantizedWeight.from_rtn(w, spec, bias_of(mod))
        if rounded is not None:
            rounded[name] = w.clone()
        H = Hessian(w.shape[1], w.device)
        H.add(x_in[:: max(1, x_in.shape[0] // 4096)])
        wq = qw.dequantize().to(w.device)
        report.errors[name] = relative_error(mod.weight.data.float(), wq, H.H if enough else None)
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
    """Divide the producer's output channels by s: a norm's weight (and bias), or a linear's rows (a Conv1D's columns)."""
    if isinstance(producer, torch.nn.Linear):
        producer.weight.data.copy_((producer.weight.data.float() / s[:, None]).to(producer.weight.dtype))
    elif is_linear(producer):
        producer.weight.data.copy_((producer.weight.data.float() / s[None, :]).to(producer.weight.dtype))
    else:
        offset = norm_offset(producer, x[:4].to(producer.weight.dtype))
        producer.weight.data.copy_(((producer.weight.data.float() + offset) / s - offset).to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.data.copy_((producer.bias.data.float() / s).to(producer.bias.dtype))
