"""Checkpoint formats: bit packing, one module per quantized layout, the streaming safetensors writer,
reading checkpoints back, and the quantized linear that runs them."""

from quantool.formats import awq, gptq

LAYOUTS = {gptq.NAME: gptq, awq.NAME: awq}
