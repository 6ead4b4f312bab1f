"""Kill a quantool run at every fault point it passes, resume it, and compare with an uninterrupted run.

Run by tests/test_kill_resume.py as its own process with one thread (no OpenMP pool exists, so forking is safe):
each run is a fork of this process that calls the command line and exits with its code; a fault point exits
with `faults.EXIT_CODE` through os._exit, as SIGKILL would (no cleanup, no flushing of Python buffers).

    python tests/kill_driver.py METHOD MODEL CALIB WORKDIR   # prints one JSON object
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no thread pools at fork: the tokenizers library's,
os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # and transformers' loader threads (torch ops in them abort after a fork)

from safetensors.torch import load_file  # noqa: E402

from quantool.cli import main  # noqa: E402
from quantool.formats import checkpoint, shards  # noqa: E402
from quantool.util import faults  # noqa: E402

shards.SHARD_BYTES = 30_000  # several shards even for a tiny model, so shards also close between layers


def run(argv: list[str], env: dict[str, str]) -> int:
    """The command line in a forked child; its exit code (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:
        signal.alarm(300)  # a hung child fails the test instead of hanging it
        os.environ.update(env)
        try:
            main(argv, standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in checkpoint.weight_files(folder):
        out.update(load_file(str(f)))
    return out


def quantization_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def command(method: str, model: str, calib: str, out: Path) -> list[str]:
    if method == "qat":
        return ["qat", model, "-o", str(out), "--data", calib, "--steps", "4", "--batch", "2", "--seq", "32", "--save-every", "2",
                "--group-size", "32", "--device", "cpu", "--json"]
    refine = ["--refine", "3", "--refine-batch", "2"] if method.endswith("-refine") else []
    return [method.removesuffix("-refine"), model, "-o", str(out), "--group-size", "32", "--calib", calib, "--nsamples", "4",
            "--seqlen", "64", "--device", "cpu", "--json", *refine]


def main_driver(method: str, model: str, calib: str, work: Path) -> dict:
    ref = work / "reference"
    trace = work / "trace.txt"
    main(command(method, model, calib, work / "warm-up"), standalone_mode=False)  # imports and caches before forking
    code = run(command(method, model, calib, ref), {faults.TRACE: str(trace)})
    if code != 0:
        return {"error": f"reference run exited {code}"}
    visits = Counter(trace.read_text().split())
    expected, expected_cfg = tensors(ref), quantization_config(ref)
    cases = []
    for name, count in sorted(visits.items()):
        for k in sorted({1, count}):
            for earlier in (False, True):  # into an empty OUT, and over quantool's own earlier output (--overwrite)
                out = work / f"{name}@{k}{'-over' if earlier else ''}"
                argv = command(method, model, calib, out)
                if earlier:
                    shutil.copytree(ref, out)
                    argv.append("--overwrite")
                killed = run(argv, {faults.ENV: f"{name}@{k}"})
                resumed = run(argv + ["--resume"], {})
                case = {"point": f"{name}@{k}", "over_earlier_output": earlier, "kill_exit": killed, "resume_exit": resumed,
                        "left_working_folder": (work / f"{out.name}.partial").exists()}
                if resumed == 0:
                    got = tensors(out)
                    case["identical"] = (sorted(got) == sorted(expected) and all(torch.equal(got[t], expected[t]) for t in got)
                                         and quantization_config(out) == expected_cfg)
                cases.append(case)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(work / f"{out.name}.partial", ignore_errors=True)
    return {"method": method, "visits": dict(visits), "cases": cases}


if __name__ == "__main__":
    method, model, calib, workdir = sys.argv[1:5]
    print(json.dumps(main_driver(method, model, calib, Path(workdir))))
