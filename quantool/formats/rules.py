"""GPT-QModel's per-module rules (`dynamic` in a GPTQ quantization_config, also read by vLLM): regex keys,
"-:" to leave a module unquantized, "+:" (or no prefix) to override its settings; the first rule that
matches a module's full name decides. Written compactly: one rule per set of modules that differ only in
their layer or expert numbers, where the pattern matches no other module."""

from __future__ import annotations

import re


def _generalize(name: str) -> str:
    """The anchored pattern of a module name with every numeric path segment (layer, expert) left open."""
    return "^" + r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split(".")) + "$"


def patterns(names: list[str], others: list[str]) -> list[str]:
    """Anchored regexes matching exactly `names` among `names` + `others`."""
    by_pattern: dict[str, list[str]] = {}
    for name in names:
        by_pattern.setdefault(_generalize(name), []).append(name)
    out = []
    for pattern, members in by_pattern.items():
        if any(re.match(pattern, other) for other in others):
            out.append("^(?:" + "|".join(re.escape(m) for m in members) + ")$")
        else:
            out.append(pattern)
    return out


def build(overrides: dict[str, dict], skipped: list[str], others: list[str]) -> dict[str, dict]:
    """dynamic rules: negative ones for `skipped`, positive ones grouping modules with equal overrides."""
    everyone = [*overrides, *skipped, *others]
    rules: dict[str, dict] = {}
    if skipped:
        rest = [n for n in everyone if n not in set(skipped)]
        rules.update({f"-:{p}": {} for p in patterns(sorted(skipped), rest)})
    groups: dict[tuple, list[str]] = {}
    for name, values in overrides.items():
        groups.setdefault(tuple(sorted(values.items())), []).append(name)
    for settings, members in groups.items():
        rest = [n for n in everyone if n not in set(members)]
        rules.update({f"+:{p}": dict(settings) for p in patterns(sorted(members), rest)})
    return rules


def resolve(rules: dict[str, dict] | None, name: str) -> dict | None:
    """The overrides for module `name` ({} when no rule matches), or None when a negative rule skips it."""
    for key, values in (rules or {}).items():
        negative = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        if re.match(pattern, name):
            return None if negative else dict(values)
    return {}


def split_at_layer(name: str) -> tuple[str, str]:
    """(its decoder layer, the name inside it), cut after the first numeric segment: model.layers.3.mlp.down_proj ->
    (model.layers.3, mlp.down_proj); ('', name) for a name with none."""
    parts = name.split(".")
    start = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), 0)
    return ".".join(parts[:start]), ".".join(parts[start:])


def block_kinds(quantized: list[str], kept: list[str]) -> list[str]:
    """The kinds of module (names inside a layer) to quantize in every block, where each kind is quantized in
    every layer or in none; [] where that does not hold."""
    on = {split_at_layer(n)[1] for n in quantized}
    off = {split_at_layer(n)[1] for n in kept}
    return sorted(on) if not on & off else []
