"""Layer-by-layer execution: capture the first decoder layer's inputs, then run one layer at a time on the
compute device (GPTQ reference `llama_sequential`); gather a few modules' inputs without finishing the layer."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

import torch
from torch import nn

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # the KV cache's keyword, by transformers version


class _Stop(Exception):
    pass


def cache_kwarg(layer: nn.Module) -> str:
    """The keyword a decoder layer takes its KV cache by: `cache` in transformers 5.2x, `past_key_values` before."""
    params = inspect.signature(layer.forward).parameters
    return next((k for k in CACHE_KWARGS if k in params), "past_key_values")


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, dict]:
    """Hidden states entering layer 0 for every sample [n, seq, hidden], and the layer's keyword arguments
    (position embeddings, masks) which are the same for every equal-length sample. The modules before the
    first layer must already be on `device`; nothing after it runs."""
    captured = {}

    def hook(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    xs = []
    try:
        for sample in samples:
            with suppress(_Stop):
                model(sample[None].to(device), use_cache=False)
            xs.append(captured["x"].to("cpu"))
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured["kwargs"].items() if k not in CACHE_KWARGS + ("use_cache",)}
    return torch.cat(xs), to_device(kwargs, "cpu")


def to_device(obj: Any, device: torch.device | str, copy: bool = False) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, copy=copy)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, copy) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, copy) for k, v in obj.items()}
    return obj


def _chunk(x: torch.Tensor, tokens: int) -> int:
    """Samples per forward call: about `tokens` tokens, which bounds the layer's intermediate activations
    (a 7B MLP's four [tokens, 11008] fp32 tensors are 0.7 GB at 4096 tokens)."""
    return max(1, tokens // max(1, x.shape[1]))


@torch.no_grad()
def run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict, device: torch.device | str, tokens: int,
              replay: dict[nn.Module, list] | None = None) -> torch.Tensor:
    """Outputs of one layer for all samples, computed in chunks on device, returned on CPU. `replay` maps
    submodules to their outputs recorded (`record_outputs`) in an earlier pass over the same chunks, with the
    same weights and inputs: those submodules are not run again (those recorded once per chunk; others run)."""
    kw = to_device(kwargs, device)
    outs = []
    chunk = _chunk(x, tokens)
    runs = len(range(0, x.shape[0], chunk))
    with _replaying({m: calls for m, calls in (replay or {}).items() if len(calls) == runs}, device):
        for i in range(0, x.shape[0], chunk):
            y = layer(x[i:i + chunk].to(device), **kw)
            outs.append((y[0] if isinstance(y, tuple) else y).to("cpu"))
    return torch.cat(outs)


@contextmanager
def _replaying(replay: dict[nn.Module, list], device):
    """Each module's forward returns its recorded outputs in call order instead of computing them."""
    def forward(calls):
        it = iter(calls)
        return lambda *args, **kwargs: to_device(next(it), device)

    own = {module: module.__dict__.get("forward") for module in replay}  # a forward set on the instance (hooks)
    for module, calls in replay.items():
        module.forward = forward(calls)
    try:
        yield
    finally:
        for module, previous in own.items():
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@contextmanager
def record_outputs(modules: list[nn.Module], store: dict) -> Iterator[None]:
    """Keep a copy on CPU of every output of each module (store[module]: list in call order), for `run_layer`'s
    replay."""
    def hook(mod, args, output):
        store.setdefault(mod, []).append(to_device(output, "cpu", copy=True))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_inputs(layer: nn.Module, x: torch.Tensor, kwargs: dict, device: torch.device | str, modules: dict[str, nn.Module],
                   on_input: Callable[[str, torch.Tensor], None],
                   tokens: int, start: tuple[nn.Module, list] | None = None,
                   around: Callable[[], AbstractContextManager] | None = None) -> None:
    """Call on_input(name, input) for each module's input, for all samples, running the layer only until the
    last of `modules` has been called (the rest of the layer's forward is skipped). With `start`, a submodule
    and its recorded calls (`record_call`), only that submodule runs, on those calls. `around` wraps every run
    (the recording of expert matrices' inputs, `experts.record_expert_inputs`)."""
    kw = to_device(kwargs, device)
    seen = set()
    chunk = _chunk(x, tokens)
    if start is None:
        runs = ((layer, (x[i:i + chunk].to(device),), kw) for i in range(0, x.shape[0], chunk))
    else:
        runs = ((start[0], to_device(args, device), to_device(ckw, device)) for args, ckw in start[1])

    def hook(name):
        def fn(mod, args):
            on_input(name, args[0])
            seen.add(name)
            if len(seen) == len(modules):
                raise _Stop
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for module, args, call_kw in runs:
            seen.clear()
            try:
                with around() if around is not None else nullcontext():
                    module(*args, **call_kw)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_inputs(modules: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call on_input(name, x) with every input a module sees while the context is open."""
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: on_input(n, args[0])) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_call(module: nn.Module, store: dict, device: torch.device | str | None = None) -> Iterator[None]:
    """Keep the args and kwargs of every call of module (to re-run it alone), moved to `device` if given."""
    def hook(mod, args, kwargs):
        call = (args, kwargs) if device is None else (to_device(args, device), to_device(kwargs, device))
        store.setdefault("calls", []).append(call)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
