"""GPU sizes and compute capabilities (data in data/gpus.json) and parsing of --gpu NAME|SIZE."""

import difflib
import json
from dataclasses import dataclass
from importlib import resources

from quantool.errors import QuantoolError
from quantool.util.units import parse_bytes


@dataclass(frozen=True)
class GPU:
    name: str
    bytes: int
    compute_capability: str | None  # None for a bare size such as 24GiB


def _table() -> dict[str, GPU]:
    raw = json.loads(resources.files("quantool.memory").joinpath("data/gpus.json").read_text())["gpus"]
    table = {}
    for name, entry in raw.items():
        for key in (name, *entry["aliases"]):
            table[key] = GPU(key, entry["bytes"], entry["compute_capability"])
    return table


def lookup(spec: str) -> GPU:
    """A GPU from its name (h100, rtx4090, ...) or a size like 24GiB."""
    key = spec.strip().lower()
    table = _table()
    if key in table:
        return table[key]
    if key[:1].isdigit() and any(c.isalpha() for c in key) and not key.isdigit():
        try:
            return GPU(spec, parse_bytes(spec), None)
        except QuantoolError:
            pass
    close = difflib.get_close_matches(key, list(table), n=4, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(table))}"
    raise QuantoolError(f"unknown GPU {spec!r}: {hint} (or give a size such as 24GiB)")
