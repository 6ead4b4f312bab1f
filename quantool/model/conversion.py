"""Checkpoint tensors to model parameters, as transformers' `from_pretrained` maps them: its per-family renamings and
weight converters (Mixtral's `block_sparse_moe.experts.3.w1.weight` on disk becomes part of the 3-D
`mlp.experts.gate_up_proj` in memory, for instance), applied to one module's tensors at a time, so a
layer-by-layer job reads exactly what `from_pretrained` would load, for families added after this release too.

The map also runs backwards for names: each parameter knows the checkpoint keys it came from, in transformers'
order (expert 0, 1, ... per source pattern), which is how a quantized checkpoint keeps the source's names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any, cast

import torch
from torch import nn


class KeyMap:
    """For a model (a meta skeleton will do) and the keys of its checkpoint: which keys make which parameter."""

    def __init__(self, model: nn.Module, keys: Iterable[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.model = model
        transforms = get_model_conversion_mapping(cast(Any, model))
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        self.sources: dict[str, dict[str | None, list[str]]] = {}  # parameter -> source pattern -> checkpoint keys
        self.converters: dict[str, Any] = {}
        self.unused: list[str] = []
        for key in sorted(keys, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if target not in meta and key in meta:
                target, pattern = key, None
            if target not in meta:
                self.unused.append(key)
                continue
            self.sources.setdefault(target, {}).setdefault(pattern, []).append(key)
            if pattern is not None:
                self.converters.setdefault(target, by_pattern[pattern])

    def __contains__(self, target: str) -> bool:
        return target in self.sources

    def keys_of(self, target: str) -> list[str]:
        """The checkpoint keys a parameter is made of."""
        return [k for keys in self.sources[target].values() for k in keys]

    def grouped_keys(self, target: str) -> list[list[str]]:
        """A converted parameter's checkpoint keys per source pattern, in the converter's pattern order (for fused
        experts: [gate keys per expert, up keys per expert])."""
        sources = self.sources[target]
        converter = self.converters.get(target)
        order = converter.source_patterns if converter is not None else list(sources)
        return [sources[p] for p in order if p in sources]

    def materialize(self, targets: list[str], read: Callable[[list[str]], dict[str, torch.Tensor]],
                    cast: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, torch.Tensor]:
        """The parameters `targets`, built one at a time from their checkpoint tensors (`read(keys)`, as stored) by
        transformers' converters, then `cast` to the working dtype: a fused parameter (experts stored one tensor each)
        is assembled as stored and cast once whole, so a layer's experts are never held in the wider dtype twice
        (once apart, once stacked)."""
        out: dict[str, torch.Tensor] = {}
        for target in targets:
            if target in out:
                continue
            tensors = read(self.keys_of(target))
            template = self.converters.get(target)
            if template is None:
                (key,) = self.keys_of(target)
                out[target] = cast(tensors.pop(key))
                continue
            converter = deepcopy(template)
            for pattern, keys in self.sources[target].items():
                for key in keys:
                    tensor = tensors.pop(key)  # held by the converter alone, so it is freed once converted
                    converter.add_tensor(target, key, pattern, lambda t=tensor: t)
                    del tensor
            produced = converter.convert(target, model=self.model, config=getattr(self.model, "config", None))
            del converter
            while produced:
                name, value = produced.popitem()
                out[name] = cast(value[0] if isinstance(value, list) else value)
                del value
        return {t: out[t] for t in targets}
