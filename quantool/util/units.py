"""Parsing and printing of sizes: parameter counts ("7B") and byte amounts ("24GiB")."""

import re

from quantool.errors import QuantoolError

_COUNT = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_BYTES = {
    "": 1, "B": 1,
    "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_count(text: str) -> int:
    """'7B' -> 7_000_000_000, '500M' -> 500_000_000, '1.5B', '125000000'."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*", str(text), re.I)
    if not m:
        raise QuantoolError(f"cannot read parameter count {text!r}: use a number with K, M or B, e.g. 7B, 500M, 1.5B")
    value = float(m.group(1)) * _COUNT[m.group(2).upper()]
    if value < 1:
        raise QuantoolError(f"parameter count must be positive, got {text!r}")
    return round(value)


def parse_bytes(text: str) -> int:
    """'24GiB' -> 25769803776, '80GB' -> 80e9."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(text), re.I)
    if not m or m.group(2).upper() not in _BYTES:
        raise QuantoolError(f"cannot read memory size {text!r}: use e.g. 24GiB, 80GB, 16384MiB")
    value = float(m.group(1)) * _BYTES[m.group(2).upper()]
    if value <= 0:
        raise QuantoolError(f"memory size must be positive, got {text!r}")
    return int(value)


def fmt_bytes(n: float) -> str:
    """Binary units, three significant digits: 1.50 GiB."""
    n = float(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
