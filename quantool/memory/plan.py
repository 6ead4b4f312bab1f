"""GPU-memory plans for inference and training of a decoder-only LM: pure arithmetic, no torch.

The prediction targets `torch.cuda.max_memory_allocated()` for the standard recipes (see docs/memory.md):
HF transformers with sdpa attention; training = forward with labels, backward, optimizer step,
`zero_grad(set_to_none=True)`; LoRA = PEFT (adapters upcast to fp32, each LoRA module casting its input to
fp32); QLoRA = bitsandbytes NF4 + double quant, bf16 compute, `prepare_model_for_kbit_training`
(non-quantized params to fp32, gradient checkpointing on); inference = `generate` with the default DynamicCache.

The pieces: `job` (what runs), `storage` (weights, adapters, optimizer states, KV cache), `activations` (what
autograd saves), `phases` (the moments of a job and what is live at each); here the plan and the solver.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from quantool.errors import QuantoolError
from quantool.memory.activations import Inventory
from quantool.memory.job import BaseQuant, Job, Method, WeightsDtype
from quantool.memory.phases import Peak, inference, quantization, training
from quantool.memory.shapes import ModelShape
from quantool.memory.storage import weight_bytes

# Outside max_memory_allocated(), measured on the H100 jobs of tests/data/memory_h100.json (torch 2.11+cu130):
# device_used - peak_reserved was 751-767 MiB (CUDA context, kernels, library handles), and the caching allocator
# reserved 4-32% more than its allocated peak (median 16.5%).
CUDA_CONTEXT_BYTES = 767 * 2**20
ALLOCATOR_CACHE = 0.165


@dataclass
class Plan:
    """A prediction: the components live at the peak (by stable id; `labels` names them), and the peak itself."""

    shape: ModelShape
    job: Job
    components: dict[str, float]
    labels: dict[str, str]
    phase: str
    params: int
    trainable_params: int
    phases: dict[str, float] = field(default_factory=dict)
    outside_allocator: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    traced_phases: dict[str, float] = field(default_factory=dict)  # the same phases without CUDA-only terms
    host: dict[str, float] = field(default_factory=dict)  # host RAM at the peak (--method quantize)
    full_finetune_bytes: int | None = None  # lora/qlora: the same batch and length trained in full (bf16, AdamW)

    @property
    def peak_bytes(self) -> int:
        return int(sum(self.components.values()))

    @property
    def traced_peak_bytes(self) -> int:
        """What a CPU trace of the same job (`trace.LiveTensorBytes`) should see: no CUDA-only terms."""
        return int(max(self.traced_phases.values()))

    @property
    def host_bytes(self) -> int:
        return int(sum(self.host.values()))

    @property
    def device_bytes(self) -> int:
        """What nvidia-smi would show: the peak plus what lives outside the caching allocator."""
        return self.peak_bytes + int(sum(self.outside_allocator.values()))


def _peak(shape: ModelShape, job: Job) -> Peak:
    if job.method == Method.QUANTIZE:
        return quantization(shape, job)
    inv = Inventory(shape, job)
    if job.method == Method.INFERENCE:
        return inference(shape, job, weight_bytes(shape, job), inv)
    return training(shape, job, weight_bytes(shape, job), inv)


def estimate(shape: ModelShape, job: Job) -> Plan:
    """Predict the peak of torch.cuda.max_memory_allocated() for this job on this model."""
    job.validate()
    peak = _peak(shape, job)
    params = shape.param_count()
    plan = Plan(shape, job, peak.components, peak.labels, peak.phase, params, peak.trainable, peak.phases, dict(peak.outside),
                peak.notes, peak.traced, peak.host)
    if not plan.components:  # nothing on a GPU
        return plan
    plan.outside_allocator["CUDA context and libraries (H100, measured)"] = CUDA_CONTEXT_BYTES
    plan.outside_allocator["allocator cache beyond the peak (median 16.5%, measured 4-32%)"] = ALLOCATOR_CACHE * plan.peak_bytes
    if shape.note:
        plan.notes.insert(0, shape.note)
    if job.method in (Method.LORA, Method.QLORA):
        full = replace(job, method=Method.FULL, quant=BaseQuant.NONE, lora_rank=None, grad_checkpointing=job.checkpointing,
                       weights_dtype=WeightsDtype.BF16, autocast=False)
        plan.full_finetune_bytes = int(sum(_peak(shape, full).components.values()))
    return plan


def solve(shape: ModelShape, job: Job, budget: int, what: str) -> tuple[int, Plan | None]:
    """Largest batch or seq whose device footprint fits in budget bytes (0 if even 1 does not)."""
    if what not in ("batch", "seq"):
        raise QuantoolError(f"--solve takes batch or seq, not {what!r}")

    def fits(v: int) -> bool:
        return estimate(shape, job.with_value(what, v)).device_bytes <= budget

    if not fits(1):
        return 0, None
    hi = 1
    limit = 1 << 24
    while hi < limit and fits(hi * 2):
        hi *= 2
    lo, hi = hi, min(hi * 2, limit)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, estimate(shape, job.with_value(what, lo))
