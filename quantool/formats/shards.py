"""Write a safetensors checkpoint tensor by tensor, as transformers lays it out: `model.safetensors`, or
`model-0000i-of-0000N.safetensors` shards with `model.safetensors.index.json` once it exceeds one shard.

No shard is ever held in memory: each tensor's bytes are appended to the open shard's data file, and the
header (8-byte length, JSON with dtype, shape and data offsets, padded to 8 bytes; the safetensors
format) is written in front when the shard closes. `state()` describes what is safely on disk, so an
interrupted run resumes by truncating to its last committed tensor, reading nothing back.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from quantool.atomic import write_json

DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.int8: "I8",
          torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}
INDEX = "model.safetensors.index.json"


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's little-endian bytes, as safetensors stores them."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardedWriter:
    def __init__(self, folder: Path, max_shard_bytes: int = 4 * 2**30, state: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        state = state or {"closed": [], "open": []}
        self.closed: list[list[dict]] = state["closed"]  # per finished shard: its entries
        self.entries: list[dict] = state["open"]  # entries of the open shard: name, dtype, shape, begin, end
        self.data = open(self._data_path(len(self.closed)), "ab")
        self.data.truncate(self.entries[-1]["end"] if self.entries else 0)  # drop what was written after the last commit
        self.data.seek(0, os.SEEK_END)

    def _data_path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.data"

    def _header_path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.safetensors"

    def add(self, tensors: dict[str, torch.Tensor]):
        for name, t in tensors.items():
            if t.dtype not in DTYPES:
                raise ValueError(f"{name}: dtype {t.dtype} has no safetensors encoding")
            begin = self.entries[-1]["end"] if self.entries else 0
            size = t.numel() * t.element_size()
            if self.entries and begin + size > self.max_shard_bytes:
                self._close_shard()
                begin = 0
            self.data.write(tensor_bytes(t))
            self.entries.append({"name": name, "dtype": DTYPES[t.dtype], "shape": list(t.shape), "begin": begin, "end": begin + size})

    def state(self) -> dict:
        """Flush to disk and describe it: everything described here survives a crash."""
        self.data.flush()
        os.fsync(self.data.fileno())
        return {"closed": self.closed, "open": list(self.entries)}

    def _close_shard(self):
        """Write the open shard's header and data into its .safetensors file and start the next shard."""
        self.data.close()
        index = len(self.closed)
        header = {"__metadata__": {"format": "pt"}}
        header.update({e["name"]: {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [e["begin"], e["end"]]}
                       for e in self.entries})
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(self._header_path(index), "wb") as out, open(self._data_path(index), "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 16 * 2**20)
        self._data_path(index).unlink()
        self.closed.append(self.entries)
        self.entries = []
        self.data = open(self._data_path(index + 1), "ab")

    def finish(self) -> list[Path]:
        """Close the last shard and give the files their transformers names (and the index when sharded)."""
        self._close_shard()
        self.data.close()
        self._data_path(len(self.closed)).unlink()
        n = len(self.closed)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            self._header_path(i).replace(self.folder / name)
        if n > 1:
            weight_map = {e["name"]: names[i] for i, shard in enumerate(self.closed) for e in shard}
            total = sum(e["end"] - e["begin"] for shard in self.closed for e in shard)
            write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, self.folder / INDEX)
        return [self.folder / name for name in names]
