"""GPU sizes (data in data/gpus.json) and parsing of --gpu NAME|SIZE."""

import difflib
import json
from importlib import resources

from quantool.errors import QuantoolError
from quantool.units import parse_bytes


def _table() -> dict[str, int]:
    raw = json.loads(resources.files("quantool.memory").joinpath("data/gpus.json").read_text())["gpus"]
    table = {}
    for name, entry in raw.items():
        for key in (name, *entry["aliases"]):
            table[key] = entry["bytes"]
    return table


def gpu_bytes(spec: str) -> tuple[str, int]:
    """('h100-80gb', bytes) from a GPU name, or (spec, bytes) from a size like 24GiB."""
    key = spec.strip().lower()
    table = _table()
    if key in table:
        return key, table[key]
    if key[:1].isdigit() and any(c.isalpha() for c in key) and not key.isdigit():
        try:
            return spec, parse_bytes(spec)
        except QuantoolError:
            pass
    close = difflib.get_close_matches(key, list(table), n=4, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(table))}"
    raise QuantoolError(f"unknown GPU {spec!r}: {hint} (or give a size such as 24GiB)")
