"""Wall time and peak RSS of one command, for the benchmark scripts in tools/.

The command is started by this file run as a small launcher process, not by the caller: Linux carries the
RSS high-water mark of a forking process across exec into the child's ru_maxrss, so a child forked straight
from a benchmark (hundreds of MB after importing torch, gigabytes after an evaluation) would report at least
the benchmark's own peak.

    python tools/child_rusage.py OUT -- CMD...     # runs CMD, writes its ru_maxrss in bytes to OUT
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def measure(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Exit status, wall seconds and peak RSS bytes of cmd, its output in log, run in log's folder."""
    start = time.perf_counter()
    rusage = log.with_suffix(".rusage")
    with open(log, "w") as out:
        status = subprocess.run([sys.executable, __file__, str(rusage), "--", *cmd], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=log.parent).returncode
    return {"exit": status, "seconds": time.perf_counter() - start, "peak_rss_bytes": int(rusage.read_text())}


def _launch(out: Path, cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    out.write_text(str(usage.ru_maxrss * 1024))
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(_launch(Path(sys.argv[1]), sys.argv[3:]))
