"""Discover a causal LM's decoder layers, their linears (nn.Linear, GPT-2's Conv1D, and each expert's matrix
inside fused MoE parameters, `model.experts`), and the scale-foldable pairs, from the module graph and probing
forward passes: no per-architecture name lists. Layers of different kinds (dense then MoE, interleaved) are
mapped per kind.

A pair (producer -> consumers) is where AWQ may fold a per-channel scale: consumers' inputs are divided
by s and the producer's outputs multiplied by s. Producers are norms (the consumer's input *is* the
norm's output tensor) or linears whose output reaches the consumer's input through an operation that is
linear per channel (attention's value path, SwiGLU's up branch, ReLU), found by doubling the
producer's output and checking that the consumer's input exactly doubles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantool.errors import QuantoolError
from quantool.model.experts import ExpertLinear, ExpertParam, _fused_params, _Watch


@dataclass
class Pair:
    producer: str  # module name inside the layer
    kind: str  # "norm" or "linear"
    consumers: list[str]
    inspect: str  # smallest module containing every consumer: run to measure the output error


def _conv1d() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's linears, weight stored [in, out])."""
    return isinstance(module, (nn.Linear, _conv1d()))


class Conv1DLinear:
    """A Conv1D seen as a linear: `weight` is [out, in] and writes through to the [in, out] parameter."""

    def __init__(self, conv: Any):
        self.weight: torch.Tensor = conv.weight.data.t()
        self.out_features, self.in_features = int(self.weight.shape[0]), int(self.weight.shape[1])
        self.bias = conv.bias


@dataclass
class LayerMap:
    linears: list[str]  # in execution order; an expert's matrix is named `<fused parameter>.<expert>`
    groups: list[list[str]]  # linears sharing one input, in execution order (true-sequential order); one per expert matrix
    pairs: list[Pair] = field(default_factory=list)
    attention_qk: list[str] = field(default_factory=list)  # siblings of the value linear: no clipping
    experts: list[ExpertParam] = field(default_factory=list)

    def expert_of(self, name: str) -> ExpertParam | None:
        return next((s for s in self.experts if name.startswith(s.param + ".") and name[len(s.param) + 1:].isdigit()), None)

    def unit(self, layer: nn.Module, name: str) -> Any:
        """What the quantizers treat as one linear: the module, a Conv1D's transposed view, or one expert's matrix."""
        spec = self.expert_of(name)
        if spec is not None:
            return ExpertLinear(layer, spec, int(name.rsplit(".", 1)[1]))
        module = layer.get_submodule(name)
        return module if isinstance(module, nn.Linear) else Conv1DLinear(module)

    def module_of(self, name: str) -> str:
        """The module a linear lives in (an expert's matrix: the module owning the fused parameter)."""
        spec = self.expert_of(name)
        return spec.param.rsplit(".", 1)[0] if spec is not None else name


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest nn.ModuleList of blocks of one class that contain linears."""
    best = None
    for name, mod in model.named_modules():
        blocks = isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1
        if blocks and any(is_linear(m) for m in mod[0].modules()) and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        found = sorted({type(m).__name__ for m in model.modules()})[:12]
        raise QuantoolError(f"cannot find decoder layers (a ModuleList of blocks with nn.Linear or Conv1D) in {type(model).__name__}; "
                            f"found modules {', '.join(found)}")
    return best


def unit_shape(module: Any) -> tuple[int, int]:
    """(out, in) of an nn.Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return int(module.weight.shape[1]), int(module.weight.shape[0])


def layer_kind(layer: nn.Module) -> str:
    """What distinguishes layers that need mapping apart: their class, linears and fused parameters."""
    linears = [n for n, m in layer.named_modules() if is_linear(m)]
    fused = sorted(_fused_params(layer).values())
    return f"{type(layer).__name__}:{','.join(linears)}|{','.join(fused)}"


def has_fused_params(layer: nn.Module) -> bool:
    return bool(_fused_params(layer))


def common_prefix(names: list[str]) -> str:
    """The longest dotted prefix shared by all the names ('' when they share none): the innermost module that
    contains every named one (for a single name, the module itself)."""
    common = []
    for level in zip(*(n.split(".") for n in names)):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


@torch.no_grad()
def map_layer(layer: nn.Module, args: tuple, kwargs: dict, probe_pairs: bool = True) -> LayerMap:
    """Probe one decoder layer with real inputs to find linears, expert matrices, shared-input groups and foldable
    pairs (a pair is kept only where folding a scale leaves the layer's output unchanged)."""
    linears = {n: m for n, m in layer.named_modules() if is_linear(m)}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    order: list[str] = []
    experts: dict[str, ExpertParam] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, inp: tuple, out: Any) -> None:
            if name in linears:
                order.append(name)
                inputs[name] = inp[0]
            if isinstance(out, torch.Tensor):
                outputs[name] = out
        return fn

    def on_product(name: str, w: torch.Tensor, x: torch.Tensor, rhs: bool, batched: bool) -> None:
        spec = _expert_param(layer, name, w, rhs, batched)
        if spec is not None and name not in experts:
            experts[name] = spec
            order.append(name)

    handles = [m.register_forward_hook(hook(n)) for n, m in layer.named_modules() if n]
    fused = _fused_params(layer)
    try:
        if fused:
            with _Watch(fused, on_product):
                layer(*args, **kwargs)
        else:
            layer(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()

    routers = _routers(linears, experts.values())
    order = [n for n in order if n not in routers]
    groups: list[list[str]] = []
    for name in order:
        if name in experts:
            groups.extend([experts[name].unit(e)] for e in range(experts[name].experts))
            continue
        for grp in groups:  # one tensor object: equal values alone can be chance (a fresh model's identical norms)
            if grp[0] in inputs and inputs[grp[0]] is inputs[name]:
                grp.append(name)
                break
        else:
            groups.append([name])

    pairs = []
    for grp in groups if probe_pairs else []:
        if grp[0] not in inputs:
            continue
        x = inputs[grp[0]]
        norms = [n for n, out in outputs.items() if n not in linears and _is_norm(layer.get_submodule(n), x)]
        producer = next((n for n in norms if outputs[n] is x), next((n for n in norms if _same(outputs[n], x)), None))
        pair = Pair(producer, "norm", grp, common_prefix(grp)) if producer is not None else None
        for cand in order if pair is None else []:
            if cand in experts or cand in grp or _out_features(linears[cand]) != x.shape[-1]:
                continue
            if _scales_through(layer, args, kwargs, linears[cand], linears[grp[0]], x):
                pair = Pair(cand, "linear", grp, common_prefix(grp))
                break
        if pair is not None and _folds_exactly(layer, args, kwargs, pair, x.shape[-1]):
            pairs.append(pair)
    # Attention's query/key projections: the other members of a shared-input group of three or more
    # linears (q, k, v run in that order; the value is the last). AWQ does not clip them (llm-awq).
    attention_qk = [n for grp in groups if len(grp) >= 3 for n in grp[:-1]]
    units = [n for grp in groups for n in grp]
    return LayerMap(units, groups, pairs, attention_qk, list(experts.values()))


def _routers(linears: dict[str, nn.Module], experts: Any) -> set[str]:
    """Linears that route tokens to experts (one output per expert, beside the experts' module): kept in full
    precision, as the peers keep them."""
    found = set()
    for spec in experts:
        block = spec.param.split(".")[0]  # the layer's MoE block (mlp, ffn, feed_forward, block_sparse_moe ...)
        found |= {n for n, m in linears.items() if n.split(".")[0] == block and _out_features(m) == spec.experts}
    return found


def _expert_param(layer: nn.Module, name: str, w: torch.Tensor, rhs: bool, batched: bool) -> ExpertParam | None:
    from quantool.model.experts import _expert_count

    p = layer.get_parameter(name)
    if not batched and w.numel() == p.numel():
        return None  # the whole parameter in one product: a router or another plain matrix, not one expert's
    experts = _expert_count(layer, name, p)
    if experts is None or p.numel() % experts:
        return None
    if batched:
        return ExpertParam(name, experts, _pair(w.shape[1:]), _pair(w.stride()[1:]),
                           int(w.storage_offset() - p.storage_offset()), int(w.stride(0)), rhs)
    step = p.numel() // experts
    return ExpertParam(name, experts, _pair(w.shape), _pair(w.stride()),
                       int(w.storage_offset() - p.storage_offset()) % step, step, rhs)


def _pair(values: Any) -> tuple[int, int]:
    a, b = values
    return int(a), int(b)


def _out_features(module: nn.Module) -> int:
    return unit_shape(module)[0]


@torch.no_grad()
def _folds_exactly(layer: nn.Module, args: tuple, kwargs: dict, pair: Pair, width: int) -> bool:
    """Does dividing the producer's output by a per-channel s and multiplying the consumers' weights by s leave the
    layer's output unchanged? Not where something else reads the producer's output too (a MoE block's router and
    experts beside a shared expert)."""
    gen = torch.Generator().manual_seed(0)
    s = torch.empty(width).uniform_(0.5, 2.0, generator=gen)
    ref = _output(layer(*args, **kwargs))
    units: dict[str, Any] = {n: layer.get_submodule(n) for n in pair.consumers}
    saved = {n: m.weight.data.clone() for n, m in units.items()}
    for m in units.values():
        w = m.weight.data
        m.weight.data.copy_(w * s.to(w) if isinstance(m, nn.Linear) else w * s.to(w)[:, None])
    handle = layer.get_submodule(pair.producer).register_forward_hook(lambda mod, i, o: o / s.to(o))
    try:
        out = _output(layer(*args, **kwargs))
    finally:
        handle.remove()
        for n, m in units.items():
            m.weight.data.copy_(saved[n])
    tol = 2e-2 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-4
    return bool(torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol * float(ref.abs().max()) + 1e-6))


def _output(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _is_norm(mod: nn.Module, x: torch.Tensor) -> bool:
    w = getattr(mod, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] == x.shape[-1] and not list(mod.children())


@torch.no_grad()
def _scales_through(layer, args, kwargs, producer: nn.Linear, consumer: nn.Linear, x: torch.Tensor) -> bool:
    """Does doubling producer's output exactly double consumer's input?"""
    seen: dict[str, torch.Tensor] = {}
    h1 = producer.register_forward_hook(lambda m, i, o: o * 2)
    h2 = consumer.register_forward_pre_hook(lambda m, i: seen.setdefault("x", i[0]))
    try:
        layer(*args, **kwargs)
    finally:
        h1.remove()
        h2.remove()
    doubled = seen.get("x")
    if doubled is None or doubled.shape != x.shape:
        return False
    tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return bool(torch.allclose(doubled.float(), 2 * x.float(), rtol=tol, atol=tol * float(x.abs().max()) + 1e-6))


def norm_offset(norm: Any, x: torch.Tensor) -> float:
    """0 for y = n(x) * w, 1 for Gemma's y = n(x) * (1 + w): probe with w = 0."""
    with torch.no_grad():
        saved = norm.weight.detach().clone()
        norm.weight.zero_()
        bias = getattr(norm, "bias", None)
        saved_b = bias.detach().clone() if isinstance(bias, torch.Tensor) else None
        if bias is not None and saved_b is not None:
            bias.zero_()
        y = norm(x.reshape(-1, x.shape[-1])[:4])
        norm.weight.copy_(saved)
        if bias is not None and saved_b is not None:
            bias.copy_(saved_b)
    return 0.0 if float(y.abs().max()) == 0 else 1.0
