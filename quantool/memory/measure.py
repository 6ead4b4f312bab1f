"""Run the predicted workload on a CUDA GPU with random weights and record the real peak.

The recipes are exactly those `plan.py` predicts (README, "What is predicted"). Weights are random
(`from_config`), which changes no byte of memory; bitsandbytes layers are swapped in on the GPU the
way `from_pretrained(quantization_config=...)` builds them. On the CPU the same recipe runs with the
attention kernel CUDA would pick forced where it matters (the math path), so a trace sees its tensors.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, cast

from quantool.errors import QuantoolError
from quantool.memory.activations import attention_backend
from quantool.memory.job import Job
from quantool.memory.shapes import ModelShape


def hf_config(shape: ModelShape) -> Any:
    """A transformers config with this shape (Llama, or Qwen2 where only q/k/v carry biases)."""
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                  num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  head_dim=shape.head_dim, tie_word_embeddings=shape.tied, max_position_embeddings=max(shape.max_position, 8192))
    if shape.mlp != "gated" or shape.experts or shape.norms_per_layer != 2:
        raise QuantoolError(f"--measure builds Llama-family shapes only; {shape.name} has a different block")
    return Qwen2Config(**common) if shape.qkv_bias else LlamaConfig(**common)


def _swap_bnb_linears(model, quant: str, torch):
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name, child in list(layer.named_modules()):
            if not isinstance(child, torch.nn.Linear):
                continue
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            w = child.weight.data
            new: Any
            if quant == "nf4":
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4", device="meta")
                new.weight = cast(Any, bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64)).to(w.device)
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=6.0, device="meta")
                new.weight = cast(Any, bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)).to(w.device)
            if child.bias is not None:
                new.bias = child.bias
            setattr(parent, name.rsplit(".", 1)[-1], new)
            del child, w
    torch.cuda.empty_cache()


def _optimizer(name: str, params, torch):
    # foreach is what torch picks by default on CUDA; naming it makes a CPU trace allocate the same way
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-5, foreach=True)
    import bitsandbytes as bnb

    return (bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit)(params, lr=1e-5)


def build_workload(shape: ModelShape, job: Job, device: str, steps: int = 2) -> tuple[Any, Callable[[], list[float]]]:
    """The model of this job (random weights) and a function that runs the job once; weights built on device."""
    import torch
    from transformers import AutoModelForCausalLM

    job.validate()
    if job.method not in ("inference", "full", "lora", "qlora"):
        raise QuantoolError(f"--measure builds the inference, full, lora and qlora recipes, not --method {job.method}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[job.weights_dtype]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=dtype, attn_implementation="sdpa")
    if job.base_quant != "none":
        _swap_bnb_linears(model, job.base_quant, torch)
    if job.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model.is_loaded_in_4bit = True
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.checkpointing)
    elif job.checkpointing:
        # renamed activation_checkpointing_enable in transformers 5.2x; the old name warns
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.enable_input_require_grads()
    if job.uses_lora:
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if job.lora_targets == ("all",) else (["q_proj", "v_proj"] if job.lora_targets == ("qv",) else list(job.lora_targets))
        model = get_peft_model(model, LoraConfig(r=job.rank, lora_alpha=2 * job.rank, lora_dropout=0.0, target_modules=targets))
    ids = torch.randint(0, shape.vocab, (job.batch, job.seq), device=device)

    if job.method == "inference":
        model.eval()
        # random weights may emit EOS early: with no EOS, generate runs exactly job.gen steps, and plain
        # greedy decoding keeps its logits processors empty, as in a default generate call
        model.generation_config.eos_token_id = None

        def generate() -> None:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job.gen, use_cache=True,
                               do_sample=False, pad_token_id=0)
        return model, _as_on_cuda(shape, job, device, generate)

    model.train()
    opt = _optimizer(job.optimizer, [p for p in model.parameters() if p.requires_grad], torch)
    device_type = torch.device(device).type

    def run():
        losses, out = [], None
        for _ in range(steps):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=job.autocast):
                if job.keep_outputs:  # `out = model(...)`: its logits live until the next forward returns
                    out = model(input_ids=ids, labels=ids, use_cache=False)
                    loss = out.loss
                else:  # Trainer style: the output is dropped once its loss is read
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses
    return model, _as_on_cuda(shape, job, device, run)


def cuda_attention(shape: ModelShape, job: Job) -> Any:
    """On the CPU, the attention kernel CUDA would use where its memory differs: the math path, forced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH]) if attention_backend(shape, job) == "math" else nullcontext()


def _as_on_cuda(shape: ModelShape, job: Job, device, run):
    if device == "cuda" or str(device).startswith("cuda:"):
        return run

    def on_cpu():
        with cuda_attention(shape, job):
            return run()
    return on_cpu


def _versions() -> dict:
    import torch

    return {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "python": platform.python_version()}


def measure(shape: ModelShape, job: Job, device: str = "cuda", steps: int = 2) -> dict:
    """Build the job, run it, return the measured peak in bytes.

    device "cuda": `torch.cuda.max_memory_allocated()` over the run, and what was live at that peak by the
    code that allocated it (from the allocator's recorded history). device "cpu": the same quantity traced op
    by op (`trace.LiveTensorBytes`), with the tensors live at the peak; it sees no CUDA-only memory.
    """
    import torch

    if job.gpus > 1:
        raise QuantoolError("--measure runs on one device; drop --gpus")
    if device == "cpu":
        from quantool.memory.trace import LiveTensorBytes

        model, run = build_workload(shape, job, "cpu", steps)
        start = time.perf_counter()
        with LiveTensorBytes("cpu", existing=[*model.parameters(), *model.buffers()]) as traced:
            run()
        return {"device": f"cpu ({platform.processor() or platform.machine()}), live tensor bytes traced op by op",
                "traced_by": "quantool.memory.trace.LiveTensorBytes", "peak_bytes": traced.peak_bytes,
                "weights_bytes": traced.start_bytes, "largest_at_peak": traced.largest_at_peak(),
                "seconds": time.perf_counter() - start, **_versions()}
    if device != "cuda":
        raise QuantoolError(f"--measure runs on cuda or cpu, not {device!r}")
    if not torch.cuda.is_available():
        raise QuantoolError("--measure needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                            "--measure cpu traces the same workload's tensors on the CPU instead")
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        model, run = build_workload(shape, job, "cuda", steps)
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    free, total = torch.cuda.mem_get_info()
    return {
        "device": torch.cuda.get_device_name(),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "weights_bytes": weights,
        "device_used_bytes": total - free,
        "live_at_peak_by_origin": live_at_peak(snapshot, torch.cuda.current_device()),
        "seconds": time.perf_counter() - start,
        **_versions(),
    }


def _origin(frames: list[dict]) -> str:
    """The innermost Python frame outside torch's own module machinery, as package/path:function."""
    for f in frames:
        name = f.get("filename", "")
        if "/torch/nn/modules/" in name or "/torch/utils/_contextlib" in name or name.startswith("<"):
            continue
        tail = name.split("site-packages/")[-1] if "site-packages/" in name else name.rsplit("/", 2)[-1]
        return f"{tail}:{f.get('name', '?')}"
    return "no Python frame (autograd engine or C++: backward, optimizer kernels, cuBLAS workspace)"


def live_at_peak(snapshot: dict, device: int = 0, top: int = 8) -> list[dict]:
    """Replay a `torch.cuda.memory._snapshot()` trace to its allocated peak and group the blocks live there
    by the code that allocated them. Blocks allocated before recording began are not in the trace."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in snapshot["device_traces"][device]:
        action, addr = event["action"], event.get("addr")
        if action == "alloc":
            live[addr] = (event["size"], _origin(event.get("frames", [])))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action in ("free_requested", "free_completed") and addr in live:
            total -= live.pop(addr)[0]
    groups: dict[str, int] = {}
    for size, origin in at_peak.values():
        groups[origin] = groups.get(origin, 0) + size
    return [{"origin": o, "bytes": b} for o, b in sorted(groups.items(), key=lambda kv: -kv[1])[:top]]
