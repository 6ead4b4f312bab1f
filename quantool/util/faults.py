"""Named fault points for crash tests: where the environment variable QUANTOOL_FAULT names a point, the process
exits there at once (`os._exit`: no cleanup, no flushing, as SIGKILL would), so a test can kill a run at every
step that writes, renames or deletes files and check that `--resume` recovers it or refuses it.

`QUANTOOL_FAULT=shards.closed@2` exits the second time that point is reached. Where QUANTOOL_FAULT_TRACE names
a file, every point reached is appended to it, so a test can kill a run at each point it really passes.
"""

from __future__ import annotations

import os

ENV = "QUANTOOL_FAULT"
TRACE = "QUANTOOL_FAULT_TRACE"
EXIT_CODE = 86

POINTS = (
    "layer.written",  # a layer's tensors appended to the open shard, before its progress is committed
    "layer.committed",  # progress.json names the layer done, before the closed shards' data files are removed
    "shards.header",  # a shard's header and data copied to its temporary file, before the rename
    "shards.closed",  # a shard's .safetensors renamed into place, before its state is committed
    "outside.written",  # the tensors outside the decoder layers appended, before the commit
    "outside.committed",  # their state committed, before the closed shards' data files are removed
    "shards.finished",  # the last shard closed and committed, before the data files are removed
    "shards.renamed",  # one shard renamed to its transformers name
    "shards.index",  # the index written
    "finalize.configs",  # config.json (and quantize_config.json) written
    "finalize.tokenizer",  # tokenizer files written
    "finalize.marker",  # quantool.json written: the checkpoint is complete
    "publish.swapped",  # the checkpoint is at OUT, the working folder not yet removed
    "qat.state",  # a training state saved
)

_seen: dict[str, int] = {}


def point(name: str) -> None:
    """Exit hard here if QUANTOOL_FAULT names this point (and, with @N, this is its N-th visit)."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}")
    if os.environ.get(TRACE):
        with open(os.environ[TRACE], "a") as trace:
            trace.write(name + "\n")
    target = os.environ.get(ENV)
    if not target or target.split("@")[0] != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(target.partition("@")[2] or 1):
        os._exit(EXIT_CODE)
