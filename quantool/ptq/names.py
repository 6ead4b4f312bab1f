"""Where a quantized layer's tensors go in the written checkpoint: under the source checkpoint's own names, so
loaders that know the family find them (Mixtral's `block_sparse_moe.experts.3.w1`, not the fused in-memory
`mlp.experts.gate_up_proj`). An expert matrix fused from several source tensors (gate and up) is split back
into them by rows; where the source itself stores the experts fused, each expert's matrix is written as
`<fused parameter>.<expert>` and the config's `quantool_experts` records how it sits in the parameter."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from quantool.model.structure import LayerMap
from quantool.quant.quantizer import QuantizedWeight


def _module(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def layer_outputs(layer: nn.Module, lmap: LayerMap, prefix: str, quantized: dict[str, QuantizedWeight], weights: Any
                  ) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight], dict[str, str], dict[str, dict]]:
    """(plain tensors, quantized modules, the linear each quantized module comes from, fused experts written per
    expert) of one layer, by checkpoint name. `prefix` ends with a dot; `weights` (model.source) knows each
    parameter's checkpoint keys."""
    fused = {s.param for s in lmap.experts if all(s.unit(e) in quantized for e in range(s.experts))}
    plain = {weights.source_name(prefix + k): v for k, v in layer.state_dict().items() if k not in fused}
    out: dict[str, QuantizedWeight] = {}
    origin: dict[str, str] = {}
    experts: dict[str, dict] = {}
    for unit, qw in quantized.items():
        spec = lmap.expert_of(unit)
        if spec is None:
            name = _module(weights.source_name(f"{prefix}{unit}.weight"))
            out[name], origin[name] = qw, unit
            continue
        e = int(unit.rsplit(".", 1)[1])
        parts = weights.expert_sources(prefix + spec.param)
        if parts and all(len(keys) == spec.experts for keys in parts):
            rows = qw.q.shape[0] // len(parts)
            for i, keys in enumerate(parts):
                out[_module(keys[e])], origin[_module(keys[e])] = qw.rows(i * rows, (i + 1) * rows), unit
        else:
            out[prefix + unit], origin[prefix + unit] = qw, unit
            experts[prefix + spec.param] = asdict(spec)
    return plain, out, origin, experts
