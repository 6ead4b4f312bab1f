"""Post-training quantization: settings (`config`), the layer loop (`pipeline`), one driver per method
(`rtn`, `gptq`, `awq`; `bnb` for bitsandbytes int8/NF4). `quantool.ptq.config` imports without torch."""

from __future__ import annotations

from typing import Any

from quantool.ptq.config import METHODS, PTQConfig

__all__ = ["METHODS", "PTQConfig", "quantize_model"]


def __getattr__(name: str) -> Any:
    if name == "quantize_model":  # the pipeline needs torch; the settings alone do not
        from quantool.ptq.pipeline import quantize_model

        return quantize_model
    raise AttributeError(name)
