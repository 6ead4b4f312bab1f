"""`quantool bench`: perplexity and speed of a baseline and its quantized variants, into one results file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantool import __version__
from quantool.device import cpu_has_bf16, default_dtype, resolve_device, speed_dtype
from quantool.errors import QuantoolError
from quantool.eval.perplexity import perplexity
from quantool.eval.speed import measure_speed
from quantool.formats.loading import load_model
from quantool.formats.qlinear import QuantLinear
from quantool.model.source import is_hub_id
from quantool.text import fit_context, read_text, tokenize
from quantool.util.config import Choice, opt

RESULTS_FORMAT = "quantool-results/1"


class Kernel(Choice):
    AUTO = "auto"  # tinygemm for 4-bit where the shape allows; dequant otherwise
    TINYGEMM = "tinygemm"
    DEQUANT = "dequant"


@dataclass
class BenchConfig:
    ppl: bool = opt(True, "Measure perplexity.", flag="--ppl/--no-ppl")
    speed: bool = opt(False, "Measure prefill/decode throughput, time to first token, peak memory.")
    text: str | None = opt(None, "Evaluation text file (default: quantool's shipped text).", type=str)
    ctx: int = opt(2048, "Window length (capped at the model's maximum).")
    stride: int | None = opt(None, "Sliding-window evaluation with this stride.", type=int)
    batch: int = opt(8, "Windows per forward pass.")
    max_tokens: int | None = opt(None, "Evaluate at most this many tokens.", type=int)
    batch_sizes: tuple[int, ...] = opt((1, 8), "Batch sizes for --speed, e.g. 1,8.")
    prompt: int = opt(128, "Prompt tokens for --speed.")
    new_tokens: int = opt(32, "Generated tokens for --speed.")
    repeats: int = opt(3, "Timed runs per measurement (the median is kept).")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1 ...")
    kernel: Kernel = opt(Kernel.AUTO, "Low-bit kernel for GPTQ/AWQ/RTN checkpoints in --speed (auto: tinygemm for 4-bit "
                         "where the shape allows).", choices=Kernel)
    text_range: tuple[float, float] = opt((0.0, 1.0), "Fractions of the text's tokens to use, e.g. 0.5,1 (keep it disjoint "
                                          "from calibration).")

    def __post_init__(self) -> None:
        self.kernel = Kernel.parse(self.kernel, "--kernel")

    def validate(self) -> BenchConfig:
        if not self.ppl and not self.speed:
            raise QuantoolError("nothing to measure: drop --no-ppl or add --speed")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise QuantoolError(f"batch sizes must be positive, got {self.batch_sizes}")
        lo, hi = self.text_range
        if not 0 <= lo < hi <= 1:
            raise QuantoolError(f"--text-range needs 0 <= start < end <= 1, got {lo},{hi}")
        return self


def environment(device: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "quantool": __version__, "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "device": str(device), "cpu_bf16": cpu_has_bf16(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return env


def describe_checkpoint(path: Path) -> dict:
    """What a checkpoint directory is, whoever wrote it: method, bits, group size, the tool that wrote it,
    size on disk and (for quantool's) quantization time. Other tools are named from the quantizer their
    quantization_config records (GPT-QModel writes meta.quantizer, llm-compressor its own keys)."""
    info: dict[str, Any] = {"path": str(path), "name": path.name, "method": "fp16", "bits": 16, "group_size": None, "quant_seconds": None,
            "tool": None}
    cfg_path = path / "config.json"
    if cfg_path.exists():
        q = json.loads(cfg_path.read_text()).get("quantization_config") or {}
        kind = q.get("quant_method")
        if kind in ("gptq", "awq"):
            info.update(method=kind, bits=q["bits"], group_size=q["group_size"], format=kind)
            if q.get("desc_act"):
                info["method"] = f"{kind} (act-order)"
        elif kind == "bitsandbytes":
            info.update(method="int8" if q.get("load_in_8bit") else "nf4", bits=8 if q.get("load_in_8bit") else 4,
                        format="bitsandbytes")
        elif kind:
            info.update(method=kind, bits=q.get("bits", info["bits"]), group_size=q.get("group_size"))
        quantizer = (q.get("meta") or {}).get("quantizer")
        if quantizer:
            info["tool"] = ", ".join(quantizer) if isinstance(quantizer, list) else str(quantizer)
        elif kind:
            info["tool"] = "unknown tool"
    meta = path / "quantool.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        cfg = m["config"]
        info.update(method=cfg["method"], quant_seconds=m.get("seconds"), tool=f"quantool {m.get('version', '')}".strip())
        if info["method"] == "gptq" and cfg.get("order", "natural") != "natural":
            info["method"] = f"gptq ({cfg['order']} order)"
        elif info["method"] == "qat" and cfg.get("fake_quant") is False:
            info["method"] = "fine-tune, then rtn (control)"
        elif info["method"] == "qat" and cfg.get("lora_rank"):
            info["method"] = f"qat (LoRA r{cfg['lora_rank']})"
        if cfg.get("refine"):
            info["method"] += f" + refine {cfg['refine']}"
    info["size_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.exists() else None
    return info


def _kernels(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in model.modules():
        name = None
        if isinstance(m, QuantLinear):
            name = f"{m.kernel} (int{m.bits})" if m.kernel == "tinygemm" else f"dequantize + {str(m.dtype).split('.')[-1]} matmul"
        elif type(m).__name__ in ("Linear4bit", "Linear8bitLt"):
            name = f"bitsandbytes {type(m).__name__}"
        elif isinstance(m, torch.nn.Linear):
            name = "torch nn.Linear"
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _named_step(on_step: Callable[[str, int, int], None] | None, name: str) -> Callable[[int, int], None] | None:
    return None if on_step is None else lambda done, total: on_step(name, done, total)


def run_bench(paths: list[str], cfg: BenchConfig, on_step: Callable[[str, int, int], None] | None = None) -> dict:
    cfg.validate()
    device = resolve_device(cfg.device)
    if not paths:
        raise QuantoolError("give at least the baseline MODEL")
    results: dict[str, Any] = {"format": RESULTS_FORMAT, "environment": environment(device), "command": " ".join(sys.argv),
               "protocol": {"ppl": cfg.ppl and {"ctx": cfg.ctx, "stride": cfg.stride, "text": cfg.text or "quantool default text",
                                                 "text_range": list(cfg.text_range), "max_tokens": cfg.max_tokens,
                                                 "description": "text tokenized once (BOS at start), non-overlapping windows of ctx tokens, "
                                                                "every token after each window's first scored" if cfg.stride is None
                                                 else "sliding windows, each scoring its last `stride` tokens"},
                            "speed": cfg.speed and {"batch_sizes": list(cfg.batch_sizes), "prompt_tokens": cfg.prompt,
                                                    "new_tokens": cfg.new_tokens, "repeats": cfg.repeats,
                                                    "dtype": str(speed_dtype(device)).removeprefix("torch."),
                                                    "dtype_native": device.type == "cuda" or speed_dtype(device) != torch.float16}},
               "models": []}
    text = read_text(cfg.text) if cfg.ppl else None
    baseline_ids = None
    for i, path in enumerate(paths):
        p = Path(path)
        if not p.exists() and not is_hub_id(path):
            raise QuantoolError(f"{path} does not exist: pass a model folder or a hub id like org/name")
        entry = describe_checkpoint(p)
        entry["baseline"] = i == 0
        ppl_dtype, fast_dtype = default_dtype(device), speed_dtype(device)
        model, tok = load_model(p, device=device, dtype=ppl_dtype if cfg.ppl else fast_dtype)
        if text is not None:
            ids = tokenize(tok, text)
            if baseline_ids is None:
                baseline_ids = ids
            elif not torch.equal(ids, baseline_ids):
                raise QuantoolError(f"{path} tokenizes the evaluation text differently from {paths[0]}: "
                                    f"perplexities would not compare; bench models that share a tokenizer")
            lo, hi = (int(f * ids.numel()) for f in cfg.text_range)
            ctx = fit_context(cfg.ctx, model.config)
            entry["ppl"] = perplexity(model, ids[lo:hi], ctx, cfg.stride, cfg.batch, cfg.max_tokens,
                                      on_step=_named_step(on_step, f"ppl {entry['name']}"))
        if cfg.speed:
            if cfg.ppl and fast_dtype != ppl_dtype:  # perplexity in fp32 on a CPU; speed in what a user would run
                del model
                model, tok = load_model(p, device=device, dtype=fast_dtype)
            chosen = "tinygemm" if cfg.kernel == "auto" else cfg.kernel
            for m in model.modules():
                if isinstance(m, QuantLinear):
                    m.use_kernel(chosen)
            entry["kernels"] = _kernels(model)
            entry["speed"] = measure_speed(model, model.config.vocab_size, cfg.batch_sizes, cfg.prompt, cfg.new_tokens, cfg.repeats)
            if on_step:
                on_step(f"speed {entry['name']}", 1, 1)
        entry["params"] = sum(p.numel() for p in model.parameters())
        results["models"].append(entry)
        del model
    return results


def read_results(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QuantoolError(f"results file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantoolError(f"{path} is not valid JSON ({exc}): regenerate it with quantool bench") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise QuantoolError(f"{path} is not a {RESULTS_FORMAT} results file (found format {found!r}): regenerate it with this version's quantool bench")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise QuantoolError(f"{path} lists no models: regenerate it with quantool bench")
    for i, m in enumerate(models):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise QuantoolError(f"{path}: model entry {i} has no name; the file was edited or is damaged")
        ppl = m.get("ppl")
        if ppl is not None and not (isinstance(ppl, dict) and isinstance(ppl.get("ppl"), (int, float)) and ppl["ppl"] > 0):
            raise QuantoolError(f"{path}: model {m['name']} has a malformed perplexity entry; regenerate the file")
    return data
