"""Post-training quantization: settings (`config`), the layer loop (`pipeline`), one driver per method
(`rtn`, `gptq`, `awq`; `bnb` for bitsandbytes int8/NF4)."""

from quantool.ptq.config import METHODS, PTQConfig
from quantool.ptq.pipeline import quantize_model

__all__ = ["METHODS", "PTQConfig", "quantize_model"]
