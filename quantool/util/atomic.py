"""Files that appear whole or not at all: write under a temporary name beside the target, then rename."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` when the block completes, and is removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json(data: Any, path: Path) -> None:
    write_text(path, json.dumps(data, indent=2))


def torch_save(obj: Any, path: Path) -> None:
    import torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)
