"""quantool: will it fit, how do I shrink it, and what did shrinking cost?"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__version__ = "0.1.0"


def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, kernel: str = "dequant") -> tuple[Any, Any]:
    """Load any checkpoint quantool writes (GPTQ, AWQ, bitsandbytes int8/NF4, fp16) for evaluation.

    Returns (model, tokenizer): the model in eval mode on `device`; GPTQ/AWQ linears run through quantool's
    QuantLinear ('dequant', or 'tinygemm' for 4-bit where the shape allows), without GPT-QModel."""
    from quantool.formats.loading import load_model

    return load_model(path, device=device, dtype=dtype, kernel=kernel)
