"""Write a safetensors checkpoint tensor by tensor, as transformers lays it out: `model.safetensors`, or
`model-0000i-of-0000N.safetensors` shards with `model.safetensors.index.json` once it exceeds one shard.

No shard is ever held in memory: each tensor's bytes are appended to the open shard's data file, and the
header (8-byte length, JSON with dtype, shape and data offsets, padded to 8 bytes; the safetensors
format) is written in front when the shard closes, into a temporary file renamed into place.

Crash safety: `state()` describes what is safely on disk, and the caller commits it (progress.json); only
after that commit (`committed()`) are the closed shards' data files removed. So a run killed anywhere resumes
from its last committed state: the open shard's data file is cut back to its last committed tensor, a shard
closed after the commit is closed again, and a data file that is missing or shorter than the state says is a
refusal, never a zero-filled tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from quantool.errors import QuantoolError
from quantool.util import faults
from quantool.util.atomic import write_json

DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.int8: "I8",
          torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 4 * 2**30  # largest shard (transformers' own default for save_pretrained is 5 GB)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's little-endian bytes, as safetensors stores them."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def shard_names(n: int) -> list[str]:
    """transformers' file names for a checkpoint of n shards."""
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedWriter:
    def __init__(self, folder: Path, max_shard_bytes: int | None = None, state: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes or SHARD_BYTES
        state = state or {"closed": [], "open": []}
        self.closed: list[list[dict]] = state["closed"]  # per finished shard: its entries
        self.entries: list[dict] = state["open"]  # entries of the open shard: name, dtype, shape, begin, end
        self.finished = bool(state.get("finished"))
        self._committed_closed = len(self.closed)
        for index in range(len(self.closed)):
            self._data_path(index).unlink(missing_ok=True)  # committed as closed: killed before they were removed
        self.data = None if self.finished else self._reopen()

    def _data_path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.data"

    def _header_path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.safetensors"

    def _reopen(self):
        """Open the open shard's data file, cut back to its last committed tensor."""
        index = len(self.closed)
        self._header_path(index).unlink(missing_ok=True)  # closed after the last commit: it will be closed again
        path, end = self._data_path(index), self.entries[-1]["end"] if self.entries else 0
        size = path.stat().st_size if path.exists() else 0
        if size < end:
            raise QuantoolError(f"{path} holds {size} bytes, but the run's progress records {end}: the working folder was "
                                f"changed or damaged; start over with --overwrite")
        data = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115 (held open across add() calls; closed by finish)
        data.truncate(end)
        data.seek(end)
        return data

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if t.dtype not in DTYPES:
                raise ValueError(f"{name}: dtype {t.dtype} has no safetensors encoding")
            begin = self.entries[-1]["end"] if self.entries else 0
            size = t.numel() * t.element_size()
            if self.entries and begin + size > self.max_shard_bytes:
                self._close_shard()
                self.data = open(self._data_path(len(self.closed)), "w+b")  # noqa: SIM115 (closed by _close_shard)
                begin = 0
            assert self.data is not None, "add() after finish()"
            self.data.write(tensor_bytes(t))
            self.entries.append({"name": name, "dtype": DTYPES[t.dtype], "shape": list(t.shape), "begin": begin, "end": begin + size})

    def state(self) -> dict:
        """Flush to disk and describe it: everything described here survives a crash once the caller commits it."""
        if self.data is not None:
            self.data.flush()
            os.fsync(self.data.fileno())
        return {"closed": self.closed, "open": list(self.entries), "finished": self.finished}

    def committed(self) -> None:
        """The state was committed: the data files of shards closed since can go."""
        for index in range(self._committed_closed, len(self.closed)):
            self._data_path(index).unlink(missing_ok=True)
        self._committed_closed = len(self.closed)

    def _close_shard(self) -> None:
        """Write the open shard's header and data into its .safetensors file (the data file stays until committed)."""
        assert self.data is not None
        self.data.close()
        index = len(self.closed)
        header = {"__metadata__": {"format": "pt"}}
        header.update({e["name"]: {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [e["begin"], e["end"]]}
                       for e in self.entries})
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        final, tmp = self._header_path(index), self._header_path(index).with_suffix(".tmp")
        with open(tmp, "wb") as out, open(self._data_path(index), "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 16 * 2**20)
            out.flush()
            os.fsync(out.fileno())
        faults.point("shards.header")
        tmp.replace(final)
        faults.point("shards.closed")
        self.closed.append(self.entries)
        self.entries = []

    def finish(self) -> None:
        """Close the last shard; commit `state()` next, then call `publish_names()`."""
        if not self.finished:
            self._close_shard()
            self.data = None
            self.finished = True

    def publish_names(self) -> list[Path]:
        """Give the closed shards their transformers names and write the index when sharded. Repeatable: a shard
        already renamed is skipped, so a run killed midway finishes here on resume."""
        self.committed()
        n = len(self.closed)
        names = shard_names(n)
        for i, name in enumerate(names):
            src, dst = self._header_path(i), self.folder / name
            if src.exists():
                src.replace(dst)
                faults.point("shards.renamed")
            elif not dst.exists():
                raise QuantoolError(f"{self.folder} lacks shard {i + 1} of {n} ({src.name} or {name}): the working folder "
                                    f"was changed or damaged; start over with --overwrite")
        if n > 1:
            weight_map = {e["name"]: names[i] for i, shard in enumerate(self.closed) for e in shard}
            total = sum(e["end"] - e["begin"] for shard in self.closed for e in shard)
            write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, self.folder / INDEX)
            faults.point("shards.index")
        return [self.folder / name for name in names]
