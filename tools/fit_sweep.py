"""quantool fit against uniform bit widths over a sweep of memory budgets, on one perplexity protocol.

    python3 /work/shared/models/smollm2-135m/to_hf.py /tmp/smollm2-135m        # the model, once (needs gguf)
    python tools/fit_sweep.py --model /tmp/smollm2-135m

The job is inference at batch 1, seq 2048 (the planner's peak: weights as stored, KV cache, activations). The
uniform checkpoints are GPTQ at 2, 3, 4 and 8 bits; their planned peaks set the budgets, and fit runs at
budgets between them, with each sensitivity measure. Calibration: the first half of the text (as
tools/peer_benchmark.py cuts it); perplexity on the second half, so they share no token. Every checkpoint is
written by the CLI in its own process (wall time and peak RSS from wait4) and evaluated by the same code.
Writes reports/smollm2-fit.json, .md and a plot (planned peak against perplexity, one line per strategy).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from shared_data import WIKITEXT

from child_rusage import measure
from peer_benchmark import calibration_windows, evaluate, save_autoround, split_text

ROOT = Path(__file__).resolve().parents[1]


def autoscheme_child(args: argparse.Namespace) -> None:
    """Runs inside AutoRound's Python: AutoScheme picks a width per linear for an average bit budget (W2/W3/W4/W8 A16,
    the same candidates), on exactly quantool's calibration windows; then plain rounding (iters 0), GPTQ v1 output."""
    import torch
    from auto_round import AutoRound, AutoScheme
    from auto_round.schemes import QuantizationScheme
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    windows = calibration_windows(tok, args.calib, args.nsamples, args.seqlen, 0)
    data = args.out.with_name(args.out.name + ".calib.json")  # AutoScheme reads text from a file: these windows, decoded
    data.write_text(json.dumps([tok.decode(w) for w in windows]))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    options = [QuantizationScheme.from_dict({"bits": int(b), "sym": True, "group_size": args.autoscheme_group, "data_type": "int",
                                             "act_bits": 16}) for b in args.bits.split(",")]
    scheme = AutoScheme(avg_bits=args.avg_bits, options=options, dataset=str(data), nsamples=len(windows), seqlen=args.seqlen,
                        ignore_scale_zp_bits=True)  # average bits of the weights alone, as fit's avg_bits
    ar = AutoRound(model, tok, scheme=scheme, iters=0, dataset=str(data), nsamples=len(windows), seqlen=args.seqlen, device_map="cpu")
    save_autoround(ar, args.out)


def planned_peak(folder: Path, job: list[str]) -> int:
    """`quantool memory --model FOLDER` for the job: the peak a written checkpoint plans."""
    out = subprocess.run(["quantool", "memory", "--model", str(folder), *job, "--json"], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout)["peak_bytes"])


def markdown(data: dict, plot: str) -> str:
    m = data["machine"]
    lines = [f"# {data['model_name']}: quantool fit against uniform bit widths", "",
             f"Measured {data['date']} on {m['cpus']} CPU cores (no GPU), Python {m['python']}, torch {m['torch']}, "
             f"transformers {m['transformers']}. Regenerate with `{data['command']}`.", "",
             f"Job: `{' '.join(data['job'])}` (inference; the planned peak counts the weights as stored, the KV cache and "
             f"the activations). Every checkpoint is GPTQ with --group-size {data['group_size']} (the largest power of two up to "
             f"it that divides every width: 64 on SmolLM2; symmetric, quantool's defaults), calibrated "
             f"on {data['nsamples']} x {data['seqlen']} tokens from the first half of {data['text']}; perplexity at "
             f"context {data['ctx']} on the first {data['max_tokens']} tokens of the second half. Planned peak: "
             f"`quantool memory --model CHECKPOINT` for the job, which reads the written checkpoint's tensor sizes. "
             f"Wall time and peak RSS are of each quantization process; fit measures the sensitivities once per measure "
             f"(its first, smallest budget's run includes that) and reuses them for the other budgets.", "",
             f"fp16: ppl {data['fp16_ppl']:.2f}.", "",
             f"![planned peak against perplexity]({plot})", "",
             "| strategy | budget | planned peak | avg bits | widths | ppl | on disk | wall time | peak RSS |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in sorted(data["runs"], key=lambda r: (r["strategy"], r["peak_bytes"])):
        budget = "–" if r.get("budget_bytes") is None else f"{r['budget_bytes'] / 2**20:.1f} MiB"
        widths = ", ".join(f"{b}-bit x{n}" for b, n in sorted(r["widths"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {r['strategy']} | {budget} | {r['peak_bytes'] / 2**20:.1f} MiB | {r['avg_bits']:.2f} | {widths} | "
                     f"{r['ppl']:.2f} | {r['size_bytes'] / 2**20:.1f} MiB | {r['seconds']:.0f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    mid = data.get("halfway")
    if mid:
        lines += ["", f"At the budget halfway between the uniform 3- and 4-bit peaks ({mid['budget_bytes'] / 2**20:.1f} MiB): "
                  f"geometric mean of the uniform 3- and 4-bit perplexities {mid['geomean_ppl']:.2f}; "
                  + "; ".join(f"{k} {v:.2f}" for k, v in mid["fit_ppl"].items()) + f"; uniform 4-bit {mid['ppl4']:.2f}."]
    lines += [""] + [f"- {note}" for note in data.get("notes", [])] if data.get("notes") else []
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in sorted({r["strategy"] for r in data["runs"]}):
        rows = sorted((r for r in data["runs"] if r["strategy"] == strategy), key=lambda r: r["peak_bytes"])
        ax.plot([r["peak_bytes"] / 2**20 for r in rows], [r["ppl"] for r in rows], marker="o", label=strategy)
    ax.axhline(data["fp16_ppl"], color="grey", linestyle=":", label="fp16")
    ax.set_yscale("log")
    ax.set_xlabel(f"planned peak of the job, MiB ({' '.join(data['job'])})")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"{data['model_name']}: fit vs uniform GPTQ widths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--text", type=Path, default=WIKITEXT)
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--sensitivity", default="gptq,rtn", help="sensitivity measures to sweep")
    ap.add_argument("--mix", default="neighbours", choices=("neighbours", "all"), help="quantool fit --mix")
    ap.add_argument("--fractions", default="0.5", help="budgets between consecutive uniform peaks, as fractions of the step")
    ap.add_argument("--fine", default="3,4:0.25,0.75", help="more fractions between one pair of widths (LO,HI:F,...)")
    ap.add_argument("--job", default="--batch 1 --seq 2048 --gen 256")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantool-fit"))
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "reports/smollm2-fit.json")
    ap.add_argument("--autoscheme-python", default=None, help="a Python with auto-round installed: AutoScheme at the average "
                    "bits fit chose at the 3/4-bit halfway budget")
    ap.add_argument("--autoscheme-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--calib", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--avg-bits", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--autoscheme-group", type=int, default=64, help="AutoScheme's group size (quantool's on the model: 64 on SmolLM2)")
    args = ap.parse_args()
    if args.autoscheme_child:
        args.out = args.autoscheme_child
        autoscheme_child(args)
        return
    import torch
    import transformers

    args.work.mkdir(parents=True, exist_ok=True)
    calib, evaluation = split_text(args.text, args.work)
    job = args.job.split()
    common = ["--group-size", str(args.group_size), "--calib", str(calib), "--nsamples", str(args.nsamples),
              "--seqlen", str(args.seqlen), "--device", "cpu"]
    data = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    data.update(date=time.strftime("%Y-%m-%d"), command="python tools/fit_sweep.py " + " ".join(sys.argv[1:]),
                model_name=args.model.name, job=job, group_size=args.group_size, nsamples=args.nsamples, seqlen=args.seqlen,
                ctx=args.ctx, max_tokens=args.max_tokens, text=args.text.name,
                machine={"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__})
    if "fp16_ppl" not in data:
        data["fp16_ppl"] = evaluate(args.model, evaluation, args.ctx, args.max_tokens)
    done = {(r["strategy"], r.get("budget_bytes"), r.get("bits")) for r in data["runs"]}

    def run(strategy: str, cmd: list[str], out: Path, env: dict | None = None, **row: object) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # a run cut short earlier
        res = measure(cmd, args.work / f"{out.name}.log", env)
        if res["exit"]:
            sys.exit(f"{' '.join(cmd)} failed: see {args.work / out.name}.log")
        result = {"strategy": strategy, **row, "peak_bytes": planned_peak(out, job), "ppl": evaluate(out, evaluation, args.ctx, args.max_tokens),
                  "size_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")), **res}
        data["runs"].append(result)
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"{strategy} {row}: ppl {result['ppl']:.2f}, peak {result['peak_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
        return result

    bits = [int(b) for b in args.bits.split(",")]
    for b in bits:
        if ("uniform", None, b) not in done:
            out = args.work / f"uniform-{b}"
            run("uniform", ["quantool", "gptq", str(args.model), "-o", str(out), "--bits", str(b), *common], out, bits=b,
                avg_bits=float(b))
    uniform = {r["bits"]: r for r in data["runs"] if r["strategy"] == "uniform"}
    for r in uniform.values():
        r["widths"] = {str(r["bits"]): json.loads((args.work / f"uniform-{r['bits']}" / "quantool.json").read_text())["quantized_linears"]}
    pair, extra = args.fine.split(":") if args.fine else ("", "")
    fine = tuple(int(b) for b in pair.split(",")) if pair else None

    def fractions(lo: int, hi: int) -> list[float]:
        return [float(f) for f in args.fractions.split(",") + (extra.split(",") if (lo, hi) == fine else [])]

    budgets = sorted({int(uniform[lo]["peak_bytes"] + f * (uniform[hi]["peak_bytes"] - uniform[lo]["peak_bytes"]))
                      for lo, hi in itertools.pairwise(bits) for f in fractions(lo, hi)})
    for sensitivity in args.sensitivity.split(","):
        cache = args.work / f"sensitivities-{sensitivity}.json"
        strategy = f"fit ({sensitivity}{', all widths' if args.mix == 'all' else ''})"
        for budget in budgets:
            if (strategy, budget, None) in done:
                continue
            out = args.work / f"fit-{sensitivity}-{args.mix}-{budget}"
            summary_file = args.work / f"{out.name}.json"
            cmd = ["quantool", "fit", str(args.model), "-o", str(out), "--budget", str(budget), "--bits", args.bits, "--mix", args.mix,
                   "--sensitivity", sensitivity, "--sensitivities", str(cache), *job, *common, "--json"]
            res_row = run(strategy, ["sh", "-c", " ".join(cmd) + f" > {summary_file}"], out, budget_bytes=budget)
            summary = json.loads(summary_file.read_text())
            res_row.update(avg_bits=summary["avg_bits"], widths=summary["widths"], fit_planned_peak_bytes=summary["peak_bytes"],
                           written_peak_bytes=summary["written_peak_bytes"], linear_bytes=summary["linear_bytes"])
            args.out.write_text(json.dumps(data, indent=2) + "\n")
    if 3 in uniform and 4 in uniform:
        half = int((uniform[3]["peak_bytes"] + uniform[4]["peak_bytes"]) / 2)
        data["halfway"] = {"budget_bytes": half, "geomean_ppl": math.sqrt(uniform[3]["ppl"] * uniform[4]["ppl"]), "ppl4": uniform[4]["ppl"],
                           "fit_ppl": {r["strategy"]: r["ppl"] for r in data["runs"] if r.get("budget_bytes") == half}}
        ours = next((r for r in data["runs"] if r["strategy"] == f"fit ({args.sensitivity.split(',')[0]})" and r.get("budget_bytes") == half), None)
        if args.autoscheme_python and ours and not any(r["strategy"].startswith("AutoScheme") for r in data["runs"]):
            version = subprocess.run([args.autoscheme_python, "-c", "import importlib.metadata as m; print(m.version('auto-round'))"],
                                     capture_output=True, text=True, check=True).stdout.strip()
            out = args.work / "autoscheme"
            cmd = [args.autoscheme_python, str(Path(__file__).resolve()), "--model", str(args.model), "--autoscheme-child", str(out),
                   "--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--bits", args.bits,
                   "--avg-bits", str(ours["avg_bits"]), "--autoscheme-group", str(args.autoscheme_group)]
            row = run(f"AutoScheme (auto-round {version})", cmd, out, avg_bits=ours["avg_bits"], env=dict(os.environ, PYTHONPATH=str(ROOT)))
            row["widths"] = {}
            args.out.write_text(json.dumps(data, indent=2) + "\n")
    png = args.out.with_name(args.out.stem + "-ppl-peak.png")
    plot(data, png)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(data, png.name))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {png}", file=sys.stderr)


if __name__ == "__main__":
    main()
