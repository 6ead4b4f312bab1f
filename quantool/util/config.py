"""Settings as dataclasses whose fields carry their command-line flag, help and choices in metadata, so each
command's options are generated from the dataclass and defaults live in one place (`quantool.cli.options`)."""

from __future__ import annotations

from dataclasses import field
from enum import Enum
from typing import Any

from quantool.errors import QuantoolError


class Choice(str, Enum):
    """A string setting with a fixed set of values (an Enum that compares equal to, and prints as, its value)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Any, flag: str) -> Any:
        try:
            return cls(value)
        except ValueError:
            raise QuantoolError(f"unknown {flag} {value!r}: choose one of {', '.join(m.value for m in cls)}") from None


def opt(default: Any, help: str, flag: str | None = None, **kw: Any) -> Any:
    """A dataclass field with its flag (default --name), help, and extra metadata: choices (an Enum or a tuple),
    type (for a None default), cli=False (not an option)."""
    return field(default=default, metadata={"help": help, "flag": flag, **kw})
