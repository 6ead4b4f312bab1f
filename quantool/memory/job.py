"""What runs on the GPU: the job the planner predicts, its choices, defaults and validation.

`Job`'s fields carry their command-line flag and help in their metadata, so `quantool memory`'s options are
generated from it and the library and the command line share one set of defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from importlib import resources
from typing import Any

from quantool.errors import QuantoolError
from quantool.memory.cuda import HOPPER, parse_capability
from quantool.memory.dtypes import DTYPE_BYTES
from quantool.util.config import Choice, opt


class Method(Choice):
    INFERENCE = "inference"
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"
    QAT = "qat"
    QUANTIZE = "quantize"


class Optimizer(Choice):
    ADAMW = "adamw"
    ADAMW8BIT = "adamw8bit"
    PAGED_ADAMW8BIT = "paged-adamw8bit"
    SGD = "sgd"


class BaseQuant(Choice):
    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"


class WeightsDtype(Choice):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class PTQMethod(Choice):
    GPTQ = "gptq"
    AWQ = "awq"
    RTN = "rtn"


class PTQDevice(Choice):
    CUDA = "cuda"
    CPU = "cpu"


OPTIMIZER_ALIASES = {"paged_adamw8bit": "paged-adamw8bit"}  # bitsandbytes' class name, as scripts spell it
LORA_DEFAULT_RANK = 16


@dataclass(frozen=True)
class Job:
    """What runs on the GPU. Defaults: inference in bf16, batch 1, 2048-token prompts, 256 new tokens."""

    method: Method = opt(Method.INFERENCE, "inference, full, lora, qlora, qat (fake-quantized fine-tuning; full, or "
                          "LoRA-QAT with --lora-rank), or quantize (quantool's own layer-by-layer PTQ; see --ptq).", choices=Method)
    batch: int = opt(1, "Batch size.")
    seq: int = opt(2048, "Training sequence length, prompt length for inference, calibration window for quantize.")
    gen: int = opt(256, "New tokens generated (inference).")
    weights_dtype: WeightsDtype = opt(WeightsDtype.BF16, "Dtype of the weights.", choices=WeightsDtype)
    autocast: bool = opt(False, "fp32 master weights with bf16 autocast (mixed precision).")
    optimizer: Optimizer = opt(Optimizer.ADAMW, "Optimizer (training).",
                               choices=(*(o.value for o in Optimizer), *OPTIMIZER_ALIASES))
    grad_checkpointing: bool | None = opt(None, "Default: on for qlora (as PEFT sets it), off otherwise.",
                                           flag="--grad-checkpointing/--no-grad-checkpointing")
    lora_rank: int | None = opt(None, f"LoRA rank: default {LORA_DEFAULT_RANK} for lora/qlora; 0 (full QAT) for qat.", type=int)
    lora_targets: tuple[str, ...] = opt(("all",), "all, qv, or a comma list such as q_proj,v_proj.")
    quant: BaseQuant = opt(BaseQuant.NONE, "Frozen base quantization (inference, lora).", choices=BaseQuant)
    kv_dtype: str | None = opt(None, "KV-cache dtype (default: the weights' dtype).", choices=tuple(DTYPE_BYTES))
    gpus: int = opt(1, "GPUs: data parallel training (see --zero) or layers split for inference.")
    zero: int = opt(0, "DeepSpeed ZeRO stage for data parallel training (0-3).")
    ptq: PTQMethod = opt(PTQMethod.GPTQ, "With --method quantize: which algorithm's job.", choices=PTQMethod)
    nsamples: int = opt(128, "With --method quantize: calibration windows of --seq tokens.")
    refine: int = opt(0, "With --method quantize: --refine steps (0: none): plans the refine step's memory, a batch of "
                      "--refine-batch windows through one layer with autograd, the learned rounding, and the full-precision "
                      "model's hidden states (--refine-target model) beside the quantized ones.")
    refine_batch: int = opt(8, "With --method quantize and --refine: windows per refine step.")
    ptq_device: PTQDevice = opt(PTQDevice.CUDA, "With --method quantize: quantize on the GPU, or entirely on the CPU "
                                 "(everything in host RAM).", choices=PTQDevice)
    calib_bytes: int | None = opt(None, "With --method quantize: size of the calibration text (default: the text "
                                   "quantool ships; `quantool memory --calib FILE` sets it).", cli=False)
    keep_outputs: bool = opt(False, "Training loop keeps `out = model(...)` until the next forward (its logits live "
                              "through backward); default: Trainer style, `loss = model(...).loss`.")
    compute_capability: str = opt(HOPPER, "The card's compute capability (cuBLAS workspace, attention kernels); "
                                   "`quantool memory --gpu NAME` sets it.", cli=False)

    def __post_init__(self) -> None:
        for f, kind in (("method", Method), ("weights_dtype", WeightsDtype), ("quant", BaseQuant), ("ptq", PTQMethod),
                        ("ptq_device", PTQDevice)):
            object.__setattr__(self, f, kind.parse(getattr(self, f), "--" + f.replace("_", "-")))
        optimizer = OPTIMIZER_ALIASES.get(str(self.optimizer), self.optimizer)
        object.__setattr__(self, "optimizer", Optimizer.parse(optimizer, "--optimizer"))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        """A Job from its asdict() form or a hand-written subset (JSON lists for lora_targets)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def rank(self) -> int:
        """The LoRA rank in effect: the given one, else the method's default."""
        if self.lora_rank is not None:
            return self.lora_rank
        return LORA_DEFAULT_RANK if self.method in (Method.LORA, Method.QLORA) else 0

    @property
    def calibration_bytes(self) -> int:
        if self.calib_bytes is not None:
            return self.calib_bytes
        return len(resources.files("quantool").joinpath("data/calibration.txt").read_bytes())

    @property
    def training(self) -> bool:
        return self.method not in (Method.INFERENCE, Method.QUANTIZE)

    @property
    def uses_lora(self) -> bool:
        return self.method in (Method.LORA, Method.QLORA) or (self.method == Method.QAT and self.rank > 0)

    @property
    def checkpointing(self) -> bool:
        return self.method == Method.QLORA if self.grad_checkpointing is None else self.grad_checkpointing

    @property
    def base_quant(self) -> BaseQuant:
        return BaseQuant.NF4 if self.method == Method.QLORA else self.quant

    def with_value(self, field_name: str, value: int) -> Job:
        """This job with one integer setting (batch, seq, ...) changed: what `memory.solve` searches over."""
        changes: dict[str, Any] = {field_name: value}
        return replace(self, **changes)

    def validate(self) -> Job:
        for name, value in (("batch", self.batch), ("seq", self.seq), ("gpus", self.gpus), ("nsamples", self.nsamples),
                            ("refine-batch", self.refine_batch)):
            if value < 1:
                raise QuantoolError(f"--{name} must be a positive integer, got {value}")
        if self.gen < 0 or self.rank < 0 or self.refine < 0:
            raise QuantoolError("--gen, --lora-rank and --refine must not be negative")
        if self.kv_dtype is not None and self.kv_dtype not in DTYPE_BYTES:
            raise QuantoolError(f"unknown --kv-dtype {self.kv_dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
        if self.zero not in (0, 1, 2, 3):
            raise QuantoolError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.method == Method.QLORA and self.quant not in (BaseQuant.NONE, BaseQuant.NF4):
            raise QuantoolError(f"--method qlora quantizes the base to nf4; it cannot use --quant {self.quant} (use --method lora --quant {self.quant})")
        if self.method in (Method.FULL, Method.QAT) and self.quant != BaseQuant.NONE:
            raise QuantoolError(f"--method {self.method} trains every weight, so the base cannot be --quant {self.quant}: use --method lora or qlora")
        if self.method in (Method.LORA, Method.QLORA) and self.rank == 0:
            raise QuantoolError(f"--method {self.method} needs --lora-rank of at least 1")
        if self.zero and not self.training:
            raise QuantoolError("--zero applies to training; inference shards layers across --gpus instead")
        if self.autocast and self.weights_dtype != WeightsDtype.FP32 and self.method == Method.FULL:
            raise QuantoolError("--autocast keeps fp32 master weights: use it with --weights-dtype fp32 (or drop it for pure bf16)")
        if self.keep_outputs and not self.training:
            raise QuantoolError(f"--keep-outputs describes a training loop that keeps the model output; --method {self.method} has none")
        parse_capability(self.compute_capability)
        return self
