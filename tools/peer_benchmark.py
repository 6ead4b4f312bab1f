"""quantool against its peers (GPT-QModel, AutoRound) on the same calibration tokens, one perplexity protocol for every
checkpoint.

    python3 /work/shared/models/smollm2-135m/to_hf.py /tmp/smollm2-135m        # the model, once (needs gguf)
    python3 -m venv --system-site-packages /tmp/peer && /tmp/peer/bin/pip install gptqmodel==7.6.0
    python tools/peer_benchmark.py --model /tmp/smollm2-135m --peer-python /tmp/peer/bin/python
    python3 -m venv --system-site-packages /tmp/ar && /tmp/ar/bin/pip install auto-round==0.16.1     # AutoRound rows
    python tools/peer_benchmark.py --model /tmp/smollm2-135m --autoround-python /tmp/ar/bin/python --configs gptq-w4g64

The text (WikiText-2 test by default) is cut at the newline nearest its middle character: the first half
is the calibration text of both tools, which draw the same windows from it (quantool's seeded disjoint
windows, handed to GPT-QModel and AutoRound as token ids); perplexity is measured on the tokens of the second half
only, so calibration and evaluation never share a token. Every quantization runs as its own process,
timed by wall clock, with peak RSS from the kernel (wait4's ru_maxrss, through tools/child_rusage.py's
launcher). Both tools use their own defaults for what the settings leave open (quantool: group-aware
order, damp 0.01, least-error group ranges; GPT-QModel 7.6: group-aware reordering, damp 0.05); bits, group,
symmetry, act-order (off), samples, length and seed are the same.
Writes reports/smollm2-peer.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from shared_data import WIKITEXT

from child_rusage import measure

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"gptq-w4g64": ("gptq", 4, 64), "gptq-w4g128": ("gptq", 4, 128), "gptq-w3g64": ("gptq", 3, 64),
           "gptq-w2g64": ("gptq", 2, 64), "awq-w4g64": ("awq", 4, 64)}


def split_text(path: Path, work: Path) -> tuple[Path, Path]:
    """(calibration file, evaluation file): the text cut at the newline nearest its middle."""
    text = path.read_text()
    cut = text.rfind("\n", 0, len(text) // 2) + 1
    calib, evaluation = work / "calibration.txt", work / "evaluation.txt"
    calib.write_text(text[:cut])
    evaluation.write_text(text[cut:])
    return calib, evaluation


def calibration_windows(tok, calib: Path, nsamples: int, seqlen: int, seed: int) -> list:
    """The calibration windows of the text exactly as quantool draws them (`quantool.text.windows`), for any tool."""
    from quantool import text

    return text.windows(text.tokenize(tok, text.read_text(str(calib))), nsamples, seqlen, seed)


def save_autoround(ar, out: Path) -> None:
    """AutoRound's GPTQ v1 export at `out` (it saves into a folder it names inside the one it is given)."""
    export = out.with_name(out.name + ".autoround")
    ar.quantize_and_save(str(export), format="auto_gptq")
    next(p for p in export.iterdir() if (p / "config.json").exists()).rename(out)
    shutil.rmtree(export)


def peer_child(args) -> None:
    """Runs inside the peer's Python: GPT-QModel quantizes on windows drawn exactly as quantool draws them."""
    from gptqmodel import GPTQModel
    from gptqmodel.quantization.config import AWQConfig, GPTQConfig
    from transformers import AutoTokenizer

    method, bits, group = CONFIGS[args.config]
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = calibration_windows(tok, args.calib, args.nsamples, args.seqlen, args.seed)
    data = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    kind = GPTQConfig if method == "gptq" else AWQConfig
    qcfg = kind(bits=bits, group_size=group, sym=method == "gptq", desc_act=False) if method == "gptq" else \
        kind(bits=bits, group_size=group)
    model = GPTQModel.load(str(args.model), qcfg)
    model.quantize(data, batch_size=1)
    model.save(str(args.out))


def autoround_child(args) -> None:
    """Runs inside AutoRound's Python: SignRound (`iters` steps per block) on exactly quantool's windows; GPTQ v1 output."""
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, bits, group = CONFIGS[args.config]
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = calibration_windows(tok, args.calib, args.nsamples, args.seqlen, args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ar = AutoRound(model, tok, bits=bits, group_size=group, sym=True, iters=args.iters, nsamples=len(windows), seqlen=args.seqlen,
                   dataset=[w[None] for w in windows], seed=args.seed, device_map="cpu")
    save_autoround(ar, args.out)


def quantool_cmd(args, name: str, calib: Path, out: Path) -> list[str]:
    method, bits, group = CONFIGS[name]
    return ["quantool", method, str(args.model), "-o", str(out), "--bits", str(bits), "--group-size", str(group),
            "--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed",
            str(args.seed), "--device", "cpu", *shlex.split(args.quantool_args)]


def written_group(path: Path) -> int:
    """The group size a checkpoint was written with (quantool falls back to one that divides every width)."""
    return json.loads((path / "config.json").read_text())["quantization_config"]["group_size"]


def evaluate(path: Path, eval_text: Path, ctx: int, max_tokens: int) -> float:
    import quantool
    from quantool.eval.perplexity import perplexity
    from quantool.text import read_text, tokenize

    model, tok = quantool.load(str(path), device="cpu")
    ids = tokenize(tok, read_text(str(eval_text)))
    return perplexity(model, ids, ctx, max_tokens=max_tokens)["ppl"]


def markdown(data: dict) -> str:
    m = data["machine"]
    base = data["fp16_ppl"]
    peers = ", ".join(f"{name} {v}" for name, v in (("GPT-QModel", data.get("peer_version")), ("auto-round", data.get("autoround_version"))) if v)
    lines = ["# SmolLM2-135M: quantool against its peers on the same tokens", "",
             f"Measured {data['date']} on {m['cpus']} CPU cores (no GPU), Python {m['python']}, torch {m['torch']}, "
             f"transformers {m['transformers']}{', ' + peers if peers else ''}. Regenerate with `{data['command']}`.", "",
             f"Model: SmolLM2-135M-Instruct (hidden 576, MLP 1536, 30 layers) as an fp16 HF folder. Calibration: "
             f"{data['nsamples']} x {data['seqlen']} tokens, seed {data['seed']}, drawn by both tools as the same windows "
             f"from the first half of {data['text']} (cut at a newline near its middle character). Evaluation: perplexity "
             f"at context {data['ctx']} on the first {data['max_tokens']} tokens of the second half, so calibration and "
             f"evaluation share no token. Every checkpoint, whoever wrote it, is loaded and evaluated by the same code. "
             f"GPTQ: symmetric, no act-order; otherwise each tool at its defaults (quantool: group-aware order, damp "
             f"0.01, least-error group ranges{', then ' + data['quantool_args'] if data.get('quantool_args') else ''}; "
             f"GPT-QModel: group-aware reordering, damp 0.05; AutoRound: SignRound, symmetric, at the iterations shown). "
             f"Wall time and peak RSS "
             f"(wait4's ru_maxrss) are of each quantization process, from this one run.", "",
             f"fp16: ppl {base:.2f}. Recovered = the share of RTN's perplexity increase that the method removes.", "",
             "| checkpoint | tool | ppl | Δppl vs fp16 | recovered | wall time | peak RSS | time quantool's best/this | RSS quantool's best/this |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["runs"]:
        if r.get("error"):
            lines.append(f"| {r['label']} | {r['tool']} | – | – | – | – | – | – | – |")
            continue
        rtn = next((x["ppl"] for x in data["runs"] if x["tool"] == "quantool" and x["label"] == r["rtn_label"]), None)
        share = None if rtn is None or r["label"] == r["rtn_label"] else (rtn - r["ppl"]) / (rtn - base)
        rec = "" if share is None else f"{share:.0%}" if share < 0.995 else f"{share:.2%}"  # w2's RTN: all near 100%
        ours = min((x for x in data["runs"] if x["label"].split()[-2:] == r["label"].split()[-2:] and x["tool"] == "quantool"
                    and x["label"] != x["rtn_label"] and not x.get("error")), key=lambda x: x["ppl"], default=None)
        ratios = ("| – | –" if ours is None or r["tool"].startswith("quantool") else
                  f"| {ours['seconds'] / r['seconds']:.2f} | {ours['peak_rss_bytes'] / r['peak_rss_bytes']:.2f}")
        group = int(r["label"].split()[-1][1:])
        written = f" (wrote g{r['group_size']})" if r.get("group_size", group) != group else ""
        lines.append(f"| {r['label']}{written} | {r['tool']} | {r['ppl']:.2f} | {r['ppl'] - base:+.2f} | {rec} | {r['seconds']:.0f} s "
                     f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB {ratios} |")
    lines += [""] + [f"- {note}" for note in data["notes"]] if data.get("notes") else []
    errors = [r for r in data["runs"] if r.get("error")]
    if errors:
        lines += ["", "Runs that did not produce a checkpoint:", ""]
        lines += [f"- {r['tool']} {r['label']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def merge(data: dict, others: list[dict]) -> dict:
    """data with the runs of other invocations added (one beside it on the other core, or one after it): each (tool,
    checkpoint) row once, the first measured kept (each invocation measures RTN and the method again), their
    commands joined."""
    seen = {(r["tool"], r["label"]) for r in data["runs"]}
    for other in others:
        data["runs"] += [r for r in other["runs"] if (r["tool"], r["label"]) not in seen]
        seen |= {(r["tool"], r["label"]) for r in other["runs"]}
        data["command"] += "  AND  " + other["command"]
        for key in ("peer_version", "autoround_version"):
            data[key] = data.get(key) or other.get(key)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="SmolLM2-135M as an HF folder (see above)")
    ap.add_argument("--text", type=Path, default=WIKITEXT)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--quantool-args", default="", help="extra options for quantool's GPTQ/AWQ runs, e.g. --quantool-args=--no-mse")
    ap.add_argument("--refine", default="", help="comma-separated METHOD:STEPS: one more quantool row each, that method "
                    "with --refine STEPS on the same windows (issue 23), e.g. --refine rtn:50,gptq:50")
    ap.add_argument("--peer-python", default=None, help="a Python with gptqmodel installed (omit: quantool only)")
    ap.add_argument("--autoround-python", default=None, help="a Python with auto-round installed (omit: no AutoRound rows)")
    ap.add_argument("--autoround-iters", default="50,200", help="AutoRound's iterations per block, one run each (50: its light "
                    "recipe, 200: its default)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantool-peer"))
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "reports/smollm2-peer.json")
    ap.add_argument("--table", action="store_true", help="only write the Markdown of --out's runs (and its notes) again")
    ap.add_argument("--merge", type=Path, action="append", default=[], help="with --table: first add to --out the runs of "
                    "another invocation's JSON (one run beside it on the other core, or after it) that --out does not have")
    ap.add_argument("--peer-child", help=argparse.SUPPRESS)
    ap.add_argument("--autoround-child", help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--calib", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        data = json.loads(args.out.read_text())
        if args.merge:
            data = merge(data, [json.loads(p.read_text()) for p in args.merge])
            args.out.write_text(json.dumps(data, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(data))
        return
    if args.peer_child or args.autoround_child:
        args.config, args.out = args.peer_child or args.autoround_child, Path(args.out)
        (peer_child if args.peer_child else autoround_child)(args)
        return
    import torch
    import transformers

    args.model, args.work, args.text = args.model.resolve(), args.work.resolve(), args.text.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    calib, evaluation = split_text(args.text, args.work)
    evaluate_ = functools.partial(evaluate, eval_text=evaluation, ctx=args.ctx, max_tokens=args.max_tokens)
    runs = []
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", PYTHONPATH=str(ROOT))

    def version(python: str | None, package: str) -> str | None:
        return python and subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version('{package}'))"],
                                         capture_output=True, text=True, check=True).stdout.strip()

    peer_version, autoround_version = version(args.peer_python, "gptqmodel"), version(args.autoround_python, "auto-round")
    data = {"date": time.strftime("%Y-%m-%d"), "command": "python tools/peer_benchmark.py " + shlex.join(sys.argv[1:]),
            "quantool_args": args.quantool_args,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__},
            "peer_version": peer_version, "autoround_version": autoround_version, "text": args.text.name, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "seed": args.seed, "ctx": args.ctx, "max_tokens": args.max_tokens, "fp16_ppl": evaluate_(args.model), "runs": runs}
    for name in args.configs.split(","):
        method, bits, group = CONFIGS[name]
        rtn_label = f"rtn w{bits} g{group}"
        label = f"{method} w{bits} g{group}"
        jobs = []
        if rtn_label not in {r["label"] for r in runs}:
            rtn_cmd = ["quantool", "rtn", str(args.model), "-o", str(args.work / rtn_label.replace(" ", "-")),
                       "--bits", str(bits), "--group-size", str(group), "--device", "cpu"]
            jobs.append(("quantool", rtn_label, rtn_cmd, None))
        out = args.work / f"quantool-{name}"
        jobs.append(("quantool", label, quantool_cmd(args, name, calib, out), None))
        for setting in filter(None, args.refine.split(",")):
            m, steps = setting.split(":")
            refined = quantool_cmd(args, name, calib, out.with_name(f"quantool-{m}-refine{steps}-{name}"))
            refined[1] = m
            jobs.append(("quantool", f"{m} + refine {steps} w{bits} g{group}", [*refined, "--refine", steps], None))
        if args.peer_python:
            peer_cmd = [args.peer_python, str(Path(__file__).resolve()), "--model", str(args.model), "--peer-child", name, "--calib", str(calib),
                        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
                        "-o", str(args.work / f"gptqmodel-{name}")]
            jobs.append((f"GPT-QModel {peer_version}", label, peer_cmd, env))
        for iters in args.autoround_iters.split(",") if args.autoround_python else []:
            ar_cmd = [args.autoround_python, str(Path(__file__).resolve()), "--model", str(args.model), "--autoround-child", name,
                      "--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
                      "--iters", iters, "-o", str(args.work / f"autoround{iters}-{name}")]
            jobs.append((f"AutoRound {autoround_version}, iters {iters}", label, ar_cmd, env))
        for tool, lab, cmd, child_env in jobs:
            path = Path(cmd[cmd.index("-o") + 1])
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path.with_name(path.name + ".partial"), ignore_errors=True)
            log = args.work / f"{path.name}.log"
            res = measure(cmd, log, child_env)
            row = {"label": lab, "tool": tool, "rtn_label": rtn_label, **res}
            if res["exit"]:
                row["error"] = (log.read_text().strip().splitlines() or ["(no output)"])[-1][:300]
            else:
                row["ppl"], row["group_size"] = evaluate_(path), written_group(path)
            runs.append(row)
            args.out.write_text(json.dumps(data, indent=2) + "\n")  # after every run: a cut-short run keeps its rows
            print(f"{tool} {lab}: {row.get('ppl', row.get('error'))}, {res['seconds']:.0f} s, "
                  f"{res['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    args.out.with_suffix(".md").write_text(markdown(data))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
