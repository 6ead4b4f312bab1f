"""click options generated from a settings dataclass: each field's flag, type, default, help and choices come from
the dataclass (its metadata, `util.config.opt`), so a command and the library share one set of defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from enum import Enum
from typing import Any

import click

from quantool.errors import QuantoolError


def _comma_list(kind: type, flag: str) -> Callable[[Any, Any, Any], Any]:
    def parse(ctx: Any, param: Any, value: Any) -> Any:
        if value is None or isinstance(value, tuple):
            return value
        try:
            return tuple(kind(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise QuantoolError(f"{flag} takes a comma list of {kind.__name__} values, got {value!r}") from None
    return parse


def config_options(cls: type, skip: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorate a command with one option per field of `cls` (fields with metadata cli=False and `skip` left out)."""
    def deco(f: Callable) -> Callable:
        for fld in reversed(dataclasses.fields(cls)):
            meta, default = fld.metadata, fld.default
            if fld.name in skip or meta.get("cli") is False:
                continue
            flag = meta.get("flag") or "--" + fld.name.replace("_", "-")
            shown = default.value if isinstance(default, Enum) else default
            kw: dict[str, Any] = dict(default=shown, show_default=default is not None, help=meta.get("help"))
            choices = meta.get("choices")
            if choices is not None:
                kw["type"] = click.Choice([c.value if isinstance(c, Enum) else c for c in choices])
            elif isinstance(default, tuple):
                kw.update(type=str, default=",".join(map(str, default)), callback=_comma_list(type(default[0]), flag))
            elif isinstance(default, bool) or (default is None and "/" in flag):
                if "/" not in flag:
                    kw["is_flag"] = True
            elif default is None:
                kw["type"] = meta["type"]
            else:
                kw["type"] = type(default)
            f = click.option(flag, fld.name, **kw)(f)
        return f
    return deco
