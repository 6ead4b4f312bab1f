"""GPU-memory planning: shapes, formulas, and the measurement harness that checks them."""

from quantool.memory.job import Job
from quantool.memory.plan import Plan, estimate, solve
from quantool.memory.shapes import ModelShape, from_hf_config, from_param_count, resolve_model

__all__ = ["Job", "ModelShape", "Plan", "estimate", "from_hf_config", "from_param_count", "resolve_model", "solve"]
