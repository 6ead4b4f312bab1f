"""Measure the memory planner's accuracy on a suite of jobs (default: tests/data/memory_suite.json).

Each case builds its workload with random weights and runs it (quantool.memory.measure): on a CUDA GPU
the peak of torch.cuda.max_memory_allocated(), on the CPU the same quantity traced op by op. The
results file is rewritten after every case, so a run cut short keeps what it measured and `--resume`
carries on. `--table` prints the Markdown table of a results file.

    python tools/measure_memory.py                          # GPU -> tests/data/memory_measurements.json
    python tools/measure_memory.py --device cpu --suite reports/memory-cpu-suite.json -o reports/memory-cpu-trace.json
    python tools/measure_memory.py --table tests/data/memory_measurements.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memory_suite import run_suite, table

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--suite", type=Path, default=ROOT / "tests" / "data" / "memory_suite.json", help="cases to run (default: %(default)s)")
    ap.add_argument("--only", help="comma list of catalog models to run")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "tests" / "data" / "memory_measurements.json")
    ap.add_argument("--resume", action="store_true", help="keep the cases already in --output")
    ap.add_argument("--table", type=Path, help="print the Markdown table of this results file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    cases = json.loads(args.suite.read_text())["cases"]
    if args.only:
        cases = [c for c in cases if c["model"] in set(args.only.split(","))]
    print(table(run_suite(cases, args.device, args.output, args.resume, log=lambda m: print(m, flush=True))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
