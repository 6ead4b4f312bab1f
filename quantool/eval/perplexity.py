"""Perplexity, by the protocol of the GPTQ and AWQ papers' evaluation code: the text tokenized once
(one BOS at the start), cut into non-overlapping windows of `ctx` tokens, every token after the first of
each window scored. With `stride`, sliding windows (the HF perplexity guide): each window scores only
its last `stride` tokens, so every scored token sees up to ctx - 1 tokens of context."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from quantool.errors import QuantoolError
from quantool.text import fit_context, read_text, tokenize


def windows(n_tokens: int, ctx: int, stride: int | None) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for each window."""
    if stride is None:
        return [(b, b + ctx, b + 1) for b in range(0, n_tokens - ctx + 1, ctx)]
    spans, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + ctx, n_tokens)
        spans.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return spans


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, ctx: int, stride: int | None = None, batch: int = 8,
               max_tokens: int | None = None, on_step: Callable[[int, int], None] | None = None) -> dict:
    """{'ppl', 'nll', 'tokens', 'windows', 'ctx', 'stride'} for a 1-D token tensor."""
    if max_tokens:
        ids = ids[:max_tokens]
    if ids.numel() < ctx:
        raise QuantoolError(f"evaluation text has {ids.numel()} tokens, fewer than one window of --ctx {ctx}: "
                            f"use a longer text or a smaller --ctx")
    spans = windows(ids.numel(), ctx, stride)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    groups = [spans[i:i + batch] for i in range(0, len(spans), batch)] if stride is None else [[s] for s in spans]
    for step, group in enumerate(groups):
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        logits = model(x, use_cache=False).logits.float()
        for row, (b, e, first) in enumerate(group):
            lo = first - b - 1
            nll = F.cross_entropy(logits[row, lo:e - b - 1], x[row, lo + 1:e - b], reduction="sum")
            total_nll += float(nll)
            total_tokens += e - first
        if on_step:
            on_step(step + 1, len(groups))
    mean_nll = total_nll / total_tokens
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": total_tokens, "windows": len(spans), "ctx": ctx, "stride": stride}


def evaluator(text: str, text_range: tuple[float, float] = (0.0, 1.0), ctx: int = 2048, max_tokens: int | None = None
              ) -> Callable[[Any, Any], float]:
    """(model, tokenizer) -> perplexity on a fixed slice of a text file; the text is tokenized once."""
    cache = {}

    def evaluate(model: Any, tok: Any) -> float:
        if "ids" not in cache:
            ids = tokenize(tok, read_text(text))
            cache["ids"] = ids[int(text_range[0] * ids.numel()):int(text_range[1] * ids.numel())]
        window = fit_context(ctx, model.config)
        return perplexity(model, cache["ids"].to(next(model.parameters()).device), window, max_tokens=max_tokens)["ppl"]

    return evaluate
