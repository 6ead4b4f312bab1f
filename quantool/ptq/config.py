"""Settings of a post-training quantization run: one dataclass, validated here, from which the command line's
options are generated (each field's metadata holds its flag and help), so defaults live in one place."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from quantool.errors import QuantoolError
from quantool.formats import LAYOUTS
from quantool.quant.gptq import ORDERS
from quantool.quant.quantizer import QuantSpec

CALIBRATED = ("gptq", "awq")
LAYERWISE = ("rtn", *CALIBRATED)
BITSANDBYTES = ("int8", "nf4")
METHODS = (*LAYERWISE, *BITSANDBYTES)


def _opt(default, help: str, flag: str | None = None, **kw):
    return field(default=default, metadata={"help": help, "flag": flag, **kw})


@dataclass
class PTQConfig:
    method: str = _opt("gptq", "rtn, gptq, awq (layer by layer, streamed from safetensors) or int8, nf4 (bitsandbytes, "
                       "whole model)", choices=METHODS)
    bits: int = _opt(4, "Bits per weight (rtn/gptq: 2, 3, 4, 8; awq: 3, 4).")
    group_size: int = _opt(128, "Columns per quantization group: 32/64/128, or -1 for per channel. A width that is not a "
                           "multiple ends in a partial group.")
    sym: bool = _opt(True, "Symmetric or zero-point quantization (rtn/gptq; awq always uses zero points).", flag="--sym/--asym")
    order: str = _opt("group", "GPTQ column order: natural; act (act-order, desc_act in the checkpoint); group "
                      "(group-aware: important groups first, checkpoint layout unchanged).", choices=ORDERS)
    static_groups: bool = _opt(False, "GPTQ with --order act: groups fixed before reordering.")
    true_sequential: bool = _opt(True, "GPTQ: quantize q/k/v, o, gate/up, down in turn, each seeing the quantized ones "
                                 "before it.", flag="--true-sequential/--no-true-sequential")
    mse: bool | None = _opt(None, "RTN/GPTQ: each group's range by least rounding error (|err|^2.4 over 80 shrink "
                            "steps, GPTQ reference's mse option) instead of min-max. Default: on for gptq, off for rtn "
                            "(RTN stays the plain min-max baseline).", flag="--mse/--no-mse")
    damp: float = _opt(0.01, "GPTQ dampening, a fraction of the Hessian's mean diagonal, in (0, 1).")
    duo_scaling: bool = _opt(False, "AWQ: scale by x^a / w^(1-a) instead of x^a.")
    clip: bool = _opt(True, "AWQ: search a clipping range per group.", flag="--clip/--no-clip")
    awq_search_tokens: int = _opt(8192, "AWQ: at most this many calibration tokens (whole windows) for its scale and "
                                  "clipping searches, which keep their inputs: bounds AWQ's memory.")
    calib: str | None = _opt(None, "Calibration .txt/.jsonl file or HF dataset id (default: text shipped with quantool).")
    nsamples: int = _opt(128, "Calibration windows.")
    seqlen: int = _opt(512, "Tokens per calibration window.")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1 ...")
    seed: int = _opt(0, "Seed of the calibration window sampling.")

    @property
    def format(self) -> str:
        """The checkpoint layout: AWQ GEMM for 4-bit AWQ, GPTQ v1 otherwise."""
        return "awq" if self.method == "awq" and self.bits == 4 else "gptq"

    def spec(self) -> QuantSpec:
        sym = self.sym and self.method != "awq"  # AWQ searches asymmetric (zero-point) groups, as llm-awq
        mse = self.method == "gptq" if self.mse is None else self.mse and self.method != "awq"
        return replace(LAYOUTS[self.format].spec(self.bits, self.group_size, sym), mse=mse)

    def validate(self) -> "PTQConfig":
        if self.method not in METHODS:
            raise QuantoolError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method in LAYERWISE:
            spec = self.spec()
            self.mse = spec.mse  # the method's default, resolved, so quantool.json records what ran
            spec.validate((3, 4) if self.method == "awq" else (2, 3, 4, 8))
        if self.nsamples < 1 or self.seqlen < 8:
            raise QuantoolError("--nsamples must be >= 1 and --seqlen >= 8")
        if not 0 < self.damp < 1:
            raise QuantoolError(f"--damp {self.damp:g} is outside (0, 1): it is a fraction of the Hessian's mean diagonal, "
                                f"e.g. 0.01 or 0.05")
        if self.order not in ORDERS:
            raise QuantoolError(f"unknown --order {self.order!r}: choose one of {', '.join(ORDERS)}")
        if self.static_groups and self.order != "act":
            raise QuantoolError("--static-groups only matters with --order act")
        if self.awq_search_tokens < 1:
            raise QuantoolError("--awq-search-tokens must be at least 1")
        return self
