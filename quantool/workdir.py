"""Outputs that appear only when complete: the work happens in OUT.partial/, whose checkpoint/ folder is
renamed to OUT at the end; an unfinished run's state stays in OUT.partial/ for --resume."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from quantool.errors import QuantoolError


def prepare(out: Path, overwrite: bool, resume: bool) -> Path:
    """Check OUT and return its working folder OUT.partial (created)."""
    work = out.with_name(out.name + ".partial")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise QuantoolError(f"{out} exists and is not empty: pass --overwrite to replace it, or choose another -o")
    if work.exists() and not resume:
        if not overwrite:
            raise QuantoolError(f"{work} holds an unfinished run: pass --resume to continue it, or --overwrite to start over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


@contextmanager
def discard_unless_started(work: Path, marker: str):
    """On a user-facing error, remove the working folder unless it already holds resumable state (marker)."""
    try:
        yield
    except QuantoolError:
        if not (work / marker).exists():
            shutil.rmtree(work, ignore_errors=True)
        raise


def publish(work: Path, out: Path):
    """Move the finished work/checkpoint to out, replacing what was there, and drop the working folder."""
    if out.exists():
        shutil.rmtree(out)
    (work / "checkpoint").rename(out)
    shutil.rmtree(work)
