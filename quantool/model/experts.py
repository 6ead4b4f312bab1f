"""Mixture-of-experts weights kept as fused parameters (transformers 5 stores a layer's experts as 3-D tensors such
as `experts.gate_up_proj` [E, 2I, H]; DBRX as [E * I, H]), found and fed by watching the layer's forward, not
by a list of families.

A probe runs the layer once under a torch function mode that sees every matrix product (`F.linear`, `matmul`,
`mm`, `bmm`) whose weight operand is a strict view of one of the layer's parameters (a router's whole matrix is
not): that view is one expert's matrix, and the product says its orientation (F.linear takes [out, in], `x @ W` takes [in, out]). The experts module's
`num_experts` (or the parameter's first dimension) gives the others, at equal strides. `ExpertLinear` exposes one
expert's matrix like an nn.Linear weight ([out, in], writing through to the fused parameter), and
`record_expert_inputs` calls back with the tokens the router really sent to each expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_LINEAR = {F.linear}
_RHS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_BATCHED = {torch.bmm, torch.Tensor.bmm}


@dataclass(frozen=True)
class ExpertParam:
    """How one fused parameter holds its experts' matrices: expert e's matrix is the parameter's storage viewed
    at `size`/`stride` from offset `base + e * step`, transposed when `rhs` (used as [in, out])."""

    param: str  # the parameter's name inside the layer
    experts: int
    size: tuple[int, int]
    stride: tuple[int, int]
    base: int
    step: int
    rhs: bool

    def unit(self, e: int) -> str:
        """The name of expert e's matrix inside the layer (the parameter's name and the expert's index)."""
        return f"{self.param}.{e}"


class ExpertLinear:
    """One expert's matrix, used like an nn.Linear by the quantizers: `weight` is [out, in] and writes through."""

    def __init__(self, layer: nn.Module, spec: ExpertParam, expert: int):
        p = layer.get_parameter(spec.param)
        view = p.data.as_strided(spec.size, spec.stride, p.data.storage_offset() + spec.base + expert * spec.step)
        self.weight = view.t() if spec.rhs else view
        self.out_features, self.in_features = self.weight.shape
        self.bias = None


_COUNTS = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")


def _expert_count(layer: nn.Module, name: str, param: torch.Tensor) -> int | None:
    """The number of experts a fused parameter holds: the count its module (or an enclosing one) states, else its
    first dimension for a 3-D parameter; None when neither says."""
    path = name.split(".")[:-1]
    while True:
        owner = layer.get_submodule(".".join(path)) if path else layer
        count = next((getattr(owner, a) for a in _COUNTS if isinstance(getattr(owner, a, None), int)), None)
        if count:
            return int(count)
        if not path:
            return int(param.shape[0]) if param.dim() == 3 else None
        path.pop()


class _Watch(TorchFunctionMode):
    """Calls on_product(param name, operand, input, rhs, batched) for every product on a view of a watched parameter."""

    def __init__(self, params: dict[int, str], on_product: Callable[..., None]):
        super().__init__()
        self.params, self.on_product = params, on_product

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _LINEAR or func in _RHS or func in _BATCHED:
            x, w = (args[0], args[1]) if len(args) > 1 else (args[0], kwargs.get("weight", kwargs.get("other")))
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                name = self.params.get(w.untyped_storage().data_ptr())
                if name is not None:
                    self.on_product(name, w, x, func not in _LINEAR, func in _BATCHED)
        return func(*args, **kwargs)


def fused_params(layer: nn.Module) -> list[torch.Tensor]:
    """The layer's matrices that no linear module owns (where fused experts live; a router's raw matrix too)."""
    owned = {id(m.weight) for m in layer.modules() if isinstance(getattr(m, "weight", None), torch.Tensor) and
             (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")}
    return [p for p in layer.parameters() if id(p) not in owned and p.dim() >= 2]


def _fused_params(layer: nn.Module) -> dict[int, str]:
    """Storage -> name of the fused parameters (`fused_params`), as the products see them."""
    fused = {id(p) for p in fused_params(layer)}
    return {p.untyped_storage().data_ptr(): n for n, p in layer.named_parameters() if id(p) in fused}


def eager_experts(model: nn.Module) -> None:
    """Run experts modules through transformers' plain per-expert loop (`_experts_implementation = "eager"`), the
    products the probes watch, instead of grouped kernels."""
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"


@contextmanager
def record_expert_inputs(layer: nn.Module, specs: list[ExpertParam], wanted: set[str],
                         on_input: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, call on_input(unit, tokens) with the tokens each expert matrix in `wanted` multiplies: the
    ones its router sent to it (rows that are all zero, a token routed elsewhere in an all-experts product, are
    left out)."""
    if not wanted:
        yield
        return
    by_name = {s.param: s for s in specs}
    params = {layer.get_parameter(s.param).untyped_storage().data_ptr(): s.param for s in specs}

    def on_product(name: str, w: torch.Tensor, x: torch.Tensor, rhs: bool, batched: bool) -> None:
        spec = by_name[name]
        p = layer.get_parameter(name)
        if batched:
            for e in range(w.shape[0]):
                if spec.unit(e) in wanted:
                    rows = x[e].reshape(-1, x.shape[-1])
                    on_input(spec.unit(e), rows[rows.abs().sum(-1) > 0])
            return
        e = (w.storage_offset() - p.storage_offset() - spec.base) // spec.step
        if spec.unit(e) in wanted:
            on_input(spec.unit(e), x.reshape(-1, x.shape[-1]))

    with _Watch(params, on_product):
        yield


def expert_units(layer: nn.Module, specs: list[ExpertParam]) -> dict[str, ExpertLinear]:
    """Every expert matrix of the layer, by unit name."""
    return {s.unit(e): ExpertLinear(layer, s, e) for s in specs for e in range(s.experts)}
