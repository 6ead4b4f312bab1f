"""Discover a causal LM's decoder layers, their linears, and the scale-foldable pairs, from the module
graph and one probing forward pass: no per-architecture name lists.

A pair (producer -> consumers) is where AWQ may fold a per-channel scale: consumers' inputs are divided
by s and the producer's outputs multiplied by s. Producers are norms (the consumer's input *is* the
norm's output tensor) or linears whose output reaches the consumer's input through an operation that is
linear per channel (attention's value path, SwiGLU's up branch, ReLU), found by doubling the
producer's output and checking that the consumer's input exactly doubles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quantool.errors import QuantoolError


@dataclass
class Pair:
    producer: str  # module name inside the layer
    kind: str  # "norm" or "linear"
    consumers: list[str]
    inspect: str  # smallest module containing every consumer: run to measure the output error


@dataclass
class LayerMap:
    linears: list[str]  # in execution order
    groups: list[list[str]]  # linears sharing one input, in execution order (true-sequential order)
    pairs: list[Pair] = field(default_factory=list)
    attention_qk: list[str] = field(default_factory=list)  # siblings of the value linear: no clipping


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest nn.ModuleList of identical blocks that contain linears."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if any(isinstance(m, nn.Linear) for m in mod[0].modules()) and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        found = sorted({type(m).__name__ for m in model.modules()})[:12]
        raise QuantoolError(f"cannot find decoder layers (a ModuleList of blocks with nn.Linear) in {type(model).__name__}; found modules {', '.join(found)}")
    return best


def _common_parent(names: list[str]) -> str:
    """The smallest module containing all the named ones (the module itself for one name)."""
    if len(names) == 1:
        return names[0]
    common = []
    for level in zip(*(n.split(".") for n in names)):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


@torch.no_grad()
def map_layer(layer: nn.Module, args: tuple, kwargs: dict) -> LayerMap:
    """Probe one decoder layer with real inputs to find linears, shared-input groups and foldable pairs."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    inputs, outputs, order = {}, {}, []

    def hook(name):
        def fn(mod, inp, out):
            if name in linears:
                order.append(name)
                inputs[name] = inp[0]
            if isinstance(out, torch.Tensor):
                outputs[name] = out
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layer.named_modules() if n]
    try:
        layer(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()

    groups: list[list[str]] = []
    for name in order:
        for grp in groups:
            if inputs[grp[0]] is inputs[name] or _same(inputs[grp[0]], inputs[name]):
                grp.append(name)
                break
        else:
            groups.append([name])

    pairs = []
    for grp in groups:
        x = inputs[grp[0]]
        producer = next((n for n, out in outputs.items() if n not in linears and (out is x or _same(out, x))
                         and _is_norm(layer.get_submodule(n), x)), None)
        if producer is not None:
            pairs.append(Pair(producer, "norm", grp, _common_parent(grp)))
            continue
        for cand in order:
            if cand in grp or linears[cand].out_features != x.shape[-1]:
                continue
            if _scales_through(layer, args, kwargs, linears[cand], linears[grp[0]], x):
                pairs.append(Pair(cand, "linear", grp, _common_parent(grp)))
                break
    # Attention's query/key projections: the other members of a shared-input group of three or more
    # linears (q, k, v run in that order; the value is the last). AWQ does not clip them (llm-awq).
    attention_qk = [n for grp in groups if len(grp) >= 3 for n in grp[:-1]]
    return LayerMap(order, groups, pairs, attention_qk)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _is_norm(mod: nn.Module, x: torch.Tensor) -> bool:
    w = getattr(mod, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] == x.shape[-1] and not list(mod.children())


@torch.no_grad()
def _scales_through(layer, args, kwargs, producer: nn.Linear, consumer: nn.Linear, x: torch.Tensor) -> bool:
    """Does doubling producer's output exactly double consumer's input?"""
    seen = {}
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


def norm_offset(norm: nn.Module, x: torch.Tensor) -> float:
    """0 for y = n(x) * w, 1 for Gemma's y = n(x) * (1 + w): probe with w = 0."""
    with torch.no_grad():
        saved = norm.weight.detach().clone()
        norm.weight.zero_()
        bias = getattr(norm, "bias", None)
        saved_b = bias.detach().clone() if isinstance(bias, torch.Tensor) else None
        if saved_b is not None:
            bias.zero_()
        y = norm(x.reshape(-1, x.shape[-1])[:4])
        norm.weight.copy_(saved)
        if saved_b is not None:
            bias.copy_(saved_b)
    return 0.0 if float(y.abs().max()) == 0 else 1.0
