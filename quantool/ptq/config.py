"""Settings of a post-training quantization run: one dataclass, validated here, from which the command line's
options are generated (each field's metadata holds its flag and help), so defaults live in one place. Importing
it needs no torch (the memory planner reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from quantool.errors import QuantoolError
from quantool.util.config import Choice, opt

if TYPE_CHECKING:
    from quantool.ptq.refine import RefineSettings
    from quantool.quant.quantizer import QuantSpec



class Method(Choice):
    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"
    INT8 = "int8"
    NF4 = "nf4"


class RefineTarget(Choice):
    MODEL = "model"
    LAYER = "layer"


class Order(Choice):
    NATURAL = "natural"
    ACT = "act"
    GROUP = "group"


CALIBRATED = (Method.GPTQ, Method.AWQ)
LAYERWISE = (Method.RTN, *CALIBRATED)
BITSANDBYTES = (Method.INT8, Method.NF4)
METHODS = tuple(m.value for m in Method)


@dataclass
class PTQConfig:
    method: Method = opt(Method.GPTQ, "rtn, gptq, awq (layer by layer, streamed from safetensors) or int8, nf4 "
                         "(bitsandbytes, whole model)", choices=Method)
    bits: int = opt(4, "Bits per weight (rtn/gptq: 2, 3, 4, 8; awq: 3, 4).")
    group_size: int = opt(128, "Columns per quantization group: 32/64/128, or -1 for per channel. Where it does not "
                          "divide every width, the largest power of two below it that does is used (and said).")
    sym: bool = opt(True, "Symmetric or zero-point quantization (rtn/gptq; awq always uses zero points).", flag="--sym/--asym")
    order: Order = opt(Order.GROUP, "GPTQ column order: natural; act (act-order, desc_act in the checkpoint); group "
                       "(group-aware: important groups first, checkpoint layout unchanged).", choices=Order)
    static_groups: bool = opt(False, "GPTQ with --order act: groups fixed before reordering.")
    true_sequential: bool = opt(True, "GPTQ: quantize q/k/v, o, gate/up, down in turn, each seeing the quantized ones "
                                "before it.", flag="--true-sequential/--no-true-sequential")
    mse: bool | None = opt(None, "RTN/GPTQ: each group's range by least rounding error (|err|^2.4 over 80 shrink "
                           "steps, GPTQ reference's mse option) instead of min-max. Default: on for gptq, off for rtn "
                           "(RTN stays the plain min-max baseline).", flag="--mse/--no-mse")
    full_range: bool = opt(True, "Symmetric groups on all 2^bits codes, the largest |w| on the extra negative one "
                           "(llama.cpp's and AutoRound's grid), or --half-range: the GPTQ reference's, +-max|w| at "
                           "+-(2^(bits-1) - 1/2) steps. Same checkpoint format (docs/quantization.md has the measurements).",
                           flag="--full-range/--half-range")
    damp: float = opt(0.01, "GPTQ dampening, a fraction of the Hessian's mean diagonal, in (0, 1).")
    duo_scaling: bool = opt(False, "AWQ: scale by x^a / w^(1-a) instead of x^a.")
    clip: bool = opt(True, "AWQ: search a clipping range per group.", flag="--clip/--no-clip")
    awq_search_tokens: int = opt(8192, "AWQ: at most this many calibration tokens (whole windows) for its scale and "
                                 "clipping searches, which keep their inputs: bounds AWQ's memory.")
    calib: str | None = opt(None, "Calibration .txt/.jsonl file or HF dataset id (default: text shipped with quantool).",
                            type=str)
    nsamples: int = opt(128, "Calibration windows.")
    seqlen: int = opt(512, "Tokens per calibration window.")
    chunk_tokens: int = opt(4096, "Tokens per layer forward call: bounds the activations of one forward.")
    expert_batch_bytes: int = opt(2**30, "MoE, GPTQ: at most this many bytes of experts' Hessians at once (more experts "
                                  "take more passes over the block).")
    expert_token_ratio: float = opt(2.0, "MoE: an expert matrix that received fewer calibration tokens than this many times its "
                                    "input width is rounded to nearest (least-error ranges) instead: with fewer, GPTQ's "
                                    "Hessian fits the tokens seen rather than the data (reports/expert-fallback.json).")
    refine: int = opt(0, "Steps of block-wise reconstruction per decoder layer after the method (learned rounding and "
                      "scales, SignRound's loop; needs calibration, also for rtn). 0: off.")
    refine_batch: int = opt(8, "--refine: calibration windows per step.")
    refine_target: RefineTarget = opt(RefineTarget.MODEL, "--refine: what a layer's output is trained to match: model (the "
                                      "full-precision model's output of the layer, AutoRound's default: it also corrects the "
                                      "error of the layers before; keeps a second stream of hidden states) or layer (the "
                                      "full-precision layer's on the quantized inputs). AWQ passes full-precision inputs on, "
                                      "so both are the same there.", choices=RefineTarget)
    refine_bf16: bool | None = opt(None, "--refine: each step's forward and backward under bfloat16 autocast; the codes "
                                   "kept are judged in full precision. Default: on where bf16 matmuls are native (GPUs "
                                   "with bf16, CPUs with AVX512-BF16 or AMX): same errors, 1.5x faster per step on a CPU.",
                                   flag="--refine-bf16/--no-refine-bf16")
    refine_compile: bool | None = opt(None, "--refine: run each step's layer forward and backward through torch.compile "
                                      "(compiled once per kind of layer, reused by all). Default: on where torch.compile "
                                      "can build kernels (a C++ compiler on CPU, Triton on CUDA), for layers of at least "
                                      "2^20 refined weights without experts: 1.1-1.3x faster per SmolLM2 step on two CPUs.",
                                      flag="--refine-compile/--no-refine-compile")
    refine_token_power: float = opt(0.5, "--refine: a layer's loss weighs each token's squared error by its target's mean "
                                    "square to the power -P: 0 is SignRound's plain MSE (carried by the few tokens of very "
                                    "large activations), 1 each token's relative error (lets those tokens get worse), 0.5 "
                                    "each token's error over its RMS (measured best on SmolLM2: docs/quantization.md).")
    refine_lr: float = opt(1.0, "--refine: learning rate as a multiple of SignRound's 1/N (decaying linearly to 0); lower "
                           "moves fewer codes (docs/quantization.md has the measurements).")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1 ...")
    seed: int = opt(0, "Seed of the calibration window sampling.")
    module_bits: dict[str, int] | None = opt(None, "Bits per decoder linear by full name (quantool fit's choice); the "
                                             "others take --bits.", cli=False)

    @property
    def calibrated(self) -> bool:
        """Whether the run reads calibration text: GPTQ and AWQ, and any method refined."""
        return self.method in CALIBRATED or (self.method in LAYERWISE and self.refine > 0)

    @property
    def model_targets(self) -> bool:
        """Whether the run carries the full-precision model's hidden states beside the quantized ones (--refine's
        model target; AWQ's inputs already are the full-precision ones)."""
        return self.refine > 0 and self.refine_target == RefineTarget.MODEL and self.method in (Method.RTN, Method.GPTQ)

    @property
    def format(self) -> str:
        """The checkpoint layout: AWQ GEMM for 4-bit AWQ, GPTQ v1 otherwise."""
        return "awq" if self.method == "awq" and self.bits == 4 else "gptq"

    def refine_settings(self) -> RefineSettings:
        from quantool.ptq.refine import RefineSettings

        return RefineSettings(self.refine, self.refine_batch, self.refine_lr, bool(self.refine_bf16), self.refine_compile,
                              self.refine_token_power)

    def spec(self) -> QuantSpec:
        from quantool.formats import LAYOUTS

        sym = self.sym and self.method != "awq"  # AWQ searches asymmetric (zero-point) groups, as llm-awq
        mse = self.method == "gptq" if self.mse is None else self.mse and self.method != "awq"
        return replace(LAYOUTS[self.format].spec(self.bits, self.group_size, sym), mse=mse, full_range=self.full_range)

    def __post_init__(self) -> None:
        self.method = Method.parse(self.method, "method")
        self.order = Order.parse(self.order, "--order")
        self.refine_target = RefineTarget.parse(self.refine_target, "--refine-target")

    def validate(self) -> PTQConfig:
        if self.method in LAYERWISE:
            spec = self.spec()
            self.mse = spec.mse  # the method's default, resolved, so quantool.json records what ran
            spec.validate((3, 4) if self.method == "awq" else (2, 3, 4, 8))
        if self.nsamples < 1 or self.seqlen < 8 or self.chunk_tokens < 1:
            raise QuantoolError("--nsamples and --chunk-tokens must be >= 1 and --seqlen >= 8")
        if not 0 < self.damp < 1:
            raise QuantoolError(f"--damp {self.damp:g} is outside (0, 1): it is a fraction of the Hessian's mean diagonal, "
                                f"e.g. 0.01 or 0.05")
        if self.static_groups and self.order != "act":
            raise QuantoolError("--static-groups only matters with --order act")
        if self.refine < 0 or self.refine_batch < 1 or not self.refine_lr > 0 or not 0 <= self.refine_token_power <= 1:
            raise QuantoolError("--refine must be >= 0 (0: off), --refine-batch >= 1, --refine-lr > 0 and "
                                "--refine-token-power between 0 and 1")
        if self.awq_search_tokens < 1:
            raise QuantoolError("--awq-search-tokens must be at least 1")
        for bits in set((self.module_bits or {}).values()):
            replace(self.spec(), bits=bits).validate()
        return self

    def spec_for(self, name: str) -> QuantSpec:
        """The quantizer of one decoder linear (its own bits where `module_bits` names it)."""
        spec = self.spec()
        return replace(spec, bits=self.module_bits[name]) if self.module_bits and name in self.module_bits else spec
