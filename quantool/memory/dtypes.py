"""Bytes per element of the dtypes the planner names (weights, activations, KV cache)."""

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
