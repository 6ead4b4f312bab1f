"""Output folders that appear only when complete, and never at the cost of files quantool did not write.

A run works in OUT.partial/ (its run id in run.json); its checkpoint/ folder takes OUT's place at the end.
OUT is replaced only when it is absent, an empty folder, or quantool's own earlier output: a folder whose
quantool.json (written last, so present only in complete checkpoints) lists every file in it. That is
checked when the run starts and again just before publishing. Publishing swaps the two folders in one
rename (Linux renameat2 RENAME_EXCHANGE), so there is no moment with neither the old output nor the new.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantool.errors import QuantoolError
from quantool.util import faults
from quantool.util.atomic import write_json

MARKER = "quantool.json"  # written last into every checkpoint: its run id and the files it wrote
RUN = "run.json"  # the working folder's run id
# files a checkpoint of quantool 0.1.0 held before quantool.json listed them
_LEGACY = ("config.json", "quantize_config.json", "generation_config.json", "model.safetensors.index.json",
           "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
           "added_tokens.json", "vocab.json", "merges.txt", MARKER)


def work_folder(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _foreign(out: Path) -> list[str]:
    """Names in OUT that quantool did not write there (all of them when OUT is no quantool output)."""
    names = sorted(p.name for p in out.iterdir())
    try:
        meta = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return names
    if not isinstance(meta, dict) or "version" not in meta:
        return names
    listed = meta.get("files")
    if isinstance(listed, list):
        return [n for n in names if n not in listed]
    return [n for n in names if n not in _LEGACY and not n.endswith(".safetensors")]


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that is a file, a mount point, or a folder holding anything but quantool's own output."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise QuantoolError(f"{out} exists and is not a folder: choose another -o (quantool writes a model folder)")
    if not out.exists():
        return
    if os.path.ismount(out):
        raise QuantoolError(f"{out} is a mount point: quantool writes beside OUT and renames the result into place, "
                            f"which cannot cross filesystems; use a folder inside it, e.g. -o {out / 'model'}")
    entries = list(out.iterdir())
    if not entries:
        return
    foreign = _foreign(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise QuantoolError(f"{out} holds files quantool did not write ({shown}): quantool replaces only an empty "
                            f"folder or its own earlier output, --overwrite included; move them away or choose another -o")
    if not overwrite:
        raise QuantoolError(f"{out} holds an earlier quantool output: pass --overwrite to replace it, or choose another -o")


def prepare(out: Path, overwrite: bool, resume: bool) -> tuple[Path, dict | None]:
    """Check OUT and return its working folder OUT.partial (created, with a run id), and, when resuming a run that
    already published OUT (killed while removing its working folder), OUT's quantool.json."""
    out = Path(out)
    work = work_folder(out)
    if resume and (work / RUN).exists():
        done = published(work, out)
        if done is not None:
            return work, done
    check_target(out, overwrite)
    if work.exists() and not work.is_dir():
        raise QuantoolError(f"{work} exists and is not a folder: move it away, quantool works there")
    if work.exists() and not resume:
        if not (work / RUN).exists() and any(work.iterdir()):
            raise QuantoolError(f"{work} exists and is not quantool's working folder: move it away or choose another -o")
        if not overwrite:
            raise QuantoolError(f"{work} holds an unfinished run: pass --resume to continue it, or --overwrite to start over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / RUN).exists():
        write_json({"run_id": uuid.uuid4().hex}, work / RUN)
    return work, None


def run_id(work: Path) -> str:
    return json.loads((work / RUN).read_text())["run_id"]


def published(work: Path, out: Path) -> dict | None:
    """OUT's quantool.json when this run already published it (a run killed while removing its working folder)."""
    try:
        meta = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("run_id") == run_id(work) else None


def publish_done(work: Path) -> None:
    """Remove the working folder of a run whose output is already published."""
    shutil.rmtree(work)


@contextmanager
def discard_unless_started(work: Path, marker: str) -> Iterator[None]:
    """On a user-facing error, remove the working folder unless it already holds resumable state (marker)."""
    try:
        yield
    except QuantoolError:
        if not (work / marker).exists():
            shutil.rmtree(work, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the system or filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(work: Path, out: Path, overwrite: bool) -> None:
    """Put work/checkpoint at OUT (checked again first: something may have appeared there meanwhile), then drop
    the working folder, and with it OUT's previous content."""
    check_target(out, overwrite)
    ckpt = work / "checkpoint"
    if out.exists() and any(out.iterdir()):
        if not _exchange(ckpt, out):
            out.rename(work / "replaced")  # the old output stays in the working folder until the new one is in place
            ckpt.rename(out)
    else:
        ckpt.rename(out)  # onto an empty folder or nothing: one rename
    faults.point("publish.swapped")
    shutil.rmtree(work)
