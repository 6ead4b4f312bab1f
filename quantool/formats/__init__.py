"""Checkpoint formats: bit packing, one module per quantized layout, the streaming safetensors writer,
reading checkpoints back, and the quantized linear that runs them.

A layout is a module with the functions of `Layout`; `LayoutConfig` is what its quantization_config records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, cast

import torch

from quantool.quant.quantizer import QuantizedWeight, QuantSpec


@dataclass(frozen=True)
class ModuleQuant:
    """One quantized module's settings as a loader must read them."""

    bits: int
    group_size: int  # -1: one group per output row


@dataclass
class LayoutConfig:
    """A checkpoint's quantization: the defaults, each quantized module's own settings where they differ (the
    loaders read those from per-module overrides), and the modules stored as plain 16-bit weights."""

    bits: int
    group_size: int
    sym: bool
    act_order: bool = False
    damp: float = 0.0
    static_groups: bool = False
    modules: dict[str, ModuleQuant] = field(default_factory=dict)
    unpacked: dict[str, str] = field(default_factory=dict)  # module -> why it is stored unpacked
    experts: dict[str, dict] = field(default_factory=dict)  # fused parameter -> how its experts sit in it (names.py)


class Layout(Protocol):
    NAME: str
    TENSORS: tuple[str, ...]

    def spec(self, bits: int, group_size: int, sym: bool) -> QuantSpec: ...

    def cannot_hold(self, bits: int, out_f: int, in_f: int) -> str | None: ...

    def pack(self, bits: int, prefix: str, w: QuantizedWeight) -> dict[str, torch.Tensor]: ...

    def unpack(self, bits: int, prefix: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight: ...

    def quantization_config(self, cfg: LayoutConfig) -> dict: ...

    def module_settings(self, qcfg: dict, name: str) -> ModuleQuant | None: ...


def uniform_group(widths: set[int], requested: int) -> int:
    """One group size for every quantized module: the largest power of two up to the requested one that divides
    every input width. Loaders need groups that divide the width (GPT-QModel's and vLLM's kernels assert it),
    and transformers' GPTQ loader (through optimum) builds every module with the config's one group size, so a
    per-module group would load there with wrong shapes."""
    if requested == -1:
        return -1
    group = requested
    while group > 1 and any(w % group for w in widths):
        group //= 2
    return group


def model_group(layout: Layout, bits: int, shapes: list[tuple[int, int]], requested: int) -> int | None:
    """The group size for linears of these (out, in) shapes in this layout: uniform over those it can hold;
    None when it can hold none."""
    widths = {i for o, i in shapes if layout.cannot_hold(bits, o, i) is None}
    return uniform_group(widths, requested) if widths else None


def _layouts() -> dict[str, Layout]:
    from quantool.formats import awq, gptq

    return {gptq.NAME: cast(Layout, gptq), awq.NAME: cast(Layout, awq)}


LAYOUTS: dict[str, Layout] = _layouts()
