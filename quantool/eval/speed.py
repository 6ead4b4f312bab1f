"""Prefill and decode throughput, time to first token and peak memory of a causal LM.

Warm-up runs are excluded and each figure is the median of `repeats` runs; on CUDA every timing
synchronizes the device. Decode speed is (t(N new tokens) - t(1 new token)) over N - 1 tokens of
greedy generation with the KV cache, so prefill does not dilute it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.no_grad()
def measure_speed(model: Any, vocab: int, batch_sizes: tuple[int, ...] = (1, 8), prompt: int = 128, new_tokens: int = 32,
                  repeats: int = 3, warmup: int = 1) -> dict:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    results = {}
    for b in batch_sizes:
        ids = torch.randint(3, vocab, (b, prompt), generator=gen).to(device)
        mask = torch.ones_like(ids)

        def generate(n: int, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> Callable[[], Any]:
            return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, max_length=None, do_sample=False,
                                          pad_token_id=0, eos_token_id=None)

        def prefill(ids: torch.Tensor = ids) -> None:
            model(ids, use_cache=False)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            prefill()
            generate(new_tokens)()
        t_prefill = statistics.median(_timed(prefill, device) for _ in range(repeats))
        t_first = statistics.median(_timed(generate(1), device) for _ in range(repeats))
        t_all = statistics.median(_timed(generate(new_tokens), device) for _ in range(repeats))
        results[str(b)] = {
            "prefill_tokens_per_s": b * prompt / t_prefill,
            # None where generating N tokens was not measurably slower than one (noise larger than the decode time)
            "decode_tokens_per_s": b * (new_tokens - 1) / (t_all - t_first) if t_all > t_first else None,
            "time_to_first_token_s": t_first,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        }
    return {"prompt_tokens": prompt, "new_tokens": new_tokens, "repeats": repeats, "by_batch": results}
