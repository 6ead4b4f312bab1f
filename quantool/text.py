"""Text for calibration, training and evaluation: a file (.txt, .jsonl with a "text" field), an HF dataset name
(online), or the default text shipped with quantool; tokenized once and cut into token windows."""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from quantool.errors import QuantoolError

DEFAULT = "default (quantool/data/calibration.txt: original prose written for quantool, Apache-2.0)"


def read_text(source: str | None) -> str:
    if source is None:
        return resources.files("quantool").joinpath("data/calibration.txt").read_text()
    path = Path(source)
    if path.exists():
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if not rows or not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
                raise QuantoolError(f"{path}: every line of a .jsonl calibration file must be an object with a \"text\" string")
            return "\n\n".join(r["text"] for r in rows)
        return path.read_text(errors="replace")
    if "/" in source and not source.startswith((".", "/")):
        try:
            from datasets import load_dataset  # optional, online only
        except ImportError:
            raise QuantoolError(f"calibration {source!r} is not a file, and loading hub datasets needs `pip install datasets`") from None
        ds = load_dataset(source, split="train")
        return "\n\n".join(ds["text"][:2000])
    raise QuantoolError(f"calibration file {source} does not exist: pass a .txt/.jsonl path, an HF dataset id, or omit --calib")


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """One long 1-D id tensor, with BOS once at the start where the tokenizer has one."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", split_special_tokens=True, verbose=False).input_ids[0]
    bos = tokenizer.bos_token_id
    return torch.cat([torch.tensor([bos]), ids]) if bos is not None else ids


def fit_context(length: int, config: Any) -> int:
    """A window length capped at the model's maximum positions."""
    return min(length, getattr(config, "max_position_embeddings", None) or length)


def windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0, log: Callable[[str], None] = print) -> torch.Tensor:
    """nsamples disjoint windows of seqlen tokens [nsamples, seqlen]: the text cut into consecutive windows, of
    which a seeded random choice is kept, so no token is used twice. A text too short for nsamples windows
    gives the ones that fit, with a warning."""
    available = ids.numel() // seqlen
    if available == 0:
        raise QuantoolError(f"calibration text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}: "
                            f"give a longer --calib text or a smaller --seqlen")
    if available < nsamples:
        log(f"warning: the calibration text has {ids.numel()} tokens, enough for {available} windows of {seqlen} without "
            f"repeating tokens, not {nsamples}: using {available} (give a longer --calib, or --nsamples {available} to "
            f"silence this)")
        nsamples = available
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=gen)[:nsamples].sort().values
    return ids[: available * seqlen].reshape(available, seqlen)[chosen]
