"""`quantool report`: results files -> a Markdown comparison (tables, PNG plots, environment) and rich tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from quantool.util.atomic import write_text
from quantool.util.units import fmt_bytes


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.2f}%"


def rows(data: dict) -> list[dict]:
    """One flat row per model with the comparisons against the file's baseline."""
    models = data["models"]
    base = next((m for m in models if m.get("baseline")), models[0])
    out = []
    for m in models:
        r = {"name": m["name"], "method": m.get("method", "?"), "bits": m.get("bits"), "group": m.get("group_size"),
             "tool": m.get("tool"), "size": m.get("size_bytes"), "quant_s": m.get("quant_seconds")}
        r["label"] = label(r)
        if m.get("size_bytes") and base.get("size_bytes"):
            r["ratio"] = base["size_bytes"] / m["size_bytes"]
        if m.get("ppl") and base.get("ppl"):
            r["ppl"] = m["ppl"]["ppl"]
            r["dppl"] = m["ppl"]["ppl"] - base["ppl"]["ppl"]
            r["dppl_pct"] = _pct(m["ppl"]["ppl"], base["ppl"]["ppl"])
        native = (data["protocol"].get("speed") or {}).get("dtype_native", False)
        if m.get("speed") and base.get("speed"):
            for b, s in m["speed"]["by_batch"].items():
                bs = base["speed"]["by_batch"].get(b)
                r[f"prefill_b{b}"] = s["prefill_tokens_per_s"]
                r[f"decode_b{b}"] = s["decode_tokens_per_s"]
                r[f"ttft_b{b}"] = s["time_to_first_token_s"]
                r[f"peak_b{b}"] = s.get("peak_memory_bytes")
                if bs and native and s["decode_tokens_per_s"] and bs["decode_tokens_per_s"]:
                    # no speed-up against a baseline that ran an emulated dtype (or an unrecorded one), or unmeasured
                    r[f"speedup_b{b}"] = s["decode_tokens_per_s"] / bs["decode_tokens_per_s"]
            r["kernels"] = m.get("kernels", {})
        out.append(r)
    return out


def label(r: dict) -> str:
    """What a checkpoint is, in a few words: method, bits, group, and the tool when it is not quantool."""
    if r["bits"] in (None, 16):
        return r["method"]
    text = f"{r['method']} w{r['bits']}" + (f" g{r['group']}" if r.get("group") else "")
    return text if not r.get("tool") or r["tool"].startswith("quantool") else f"{text} ({r['tool']})"


def fmt_or_dash(v: float | None, spec: str = "{:.2f}") -> str:
    return "-" if v is None else spec.format(v)


def markdown(data: dict, images: dict[str, str]) -> str:
    rs = rows(data)
    base = data["models"][0]
    lines = [f"# Quantization report: {base['name']}", ""]
    env = data["environment"]
    lines += [f"Measured {env['date']} on {env.get('gpu') or env['cpu']} ({env['device']}, {env['cpu_count']} CPU cores); "
              f"torch {env['torch']}, transformers {env['transformers']}"
              + (f", bitsandbytes {env['bitsandbytes']}" if env.get("bitsandbytes") else "") + f", quantool {env['quantool']}.", ""]
    ppl = data["protocol"].get("ppl")
    if ppl:
        lines += ["## Quality", "",
                  f"Perplexity protocol: {ppl['description']}; ctx {ppl['ctx']}"
                  + (f", stride {ppl['stride']}" if ppl.get("stride") else "")
                  + f"; text `{ppl['text']}`, fraction {ppl['text_range'][0]:.2f}-{ppl['text_range'][1]:.2f} of its tokens"
                  + (f", first {ppl['max_tokens']} tokens" if ppl.get("max_tokens") else "")
                  + f", {base['ppl']['tokens']} tokens scored. Numbers from other protocols do not compare.", "",
                  "| model | method | bits | group | written by | perplexity | change vs fp16 | change % | size on disk | compression | quantization time |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            lines.append(f"| {r['name']} | {r['method']} | {r['bits']} | {fmt_or_dash(r['group'], '{}')} | {r['tool'] or '-'} "
                         f"| {fmt_or_dash(r.get('ppl'), '{:.4f}')} "
                         f"| {fmt_or_dash(r.get('dppl'), '{:+.4f}')} | {r.get('dppl_pct', '-')} | {fmt_bytes(r['size']) if r['size'] else '-'} "
                         f"| {fmt_or_dash(r.get('ratio'), '{:.2f}x')} | {fmt_or_dash(r['quant_s'], '{:.1f} s')} |")
        lines.append("")
        if "ppl" in images:
            lines += [f"![perplexity vs size]({images['ppl']})", ""]
    speed = data["protocol"].get("speed")
    if speed:
        dtype = (f"Models ran in {speed['dtype']}" + (" (this CPU has bf16 units)" if speed["dtype"] == "bfloat16" and env["device"] == "cpu"
                                                     else "") + "." if speed.get("dtype") else
                 "The dtype the models ran in was not recorded, so no speed-up is given.")
        lines += ["## Speed", "",
                  f"Greedy generation, prompt {speed['prompt_tokens']} tokens, {speed['new_tokens']} new tokens, median of "
                  f"{speed['repeats']} runs after a warm-up; decode = (t(N) - t(1)) / (N - 1) tokens. {dtype}", ""]
        for b in speed["batch_sizes"]:
            lines += [f"Batch {b}:", "", "| model | prefill tok/s | decode tok/s | decode speedup | time to first token | peak memory |",
                      "|---|---|---|---|---|---|"]
            for r in rs:
                peak = r.get(f"peak_b{b}")
                lines.append(f"| {r['name']} | {fmt_or_dash(r.get(f'prefill_b{b}'), '{:.0f}')} | {fmt_or_dash(r.get(f'decode_b{b}'), '{:.1f}')} "
                             f"| {fmt_or_dash(r.get(f'speedup_b{b}'), '{:.2f}x')} | {fmt_or_dash(r.get(f'ttft_b{b}'), '{:.4f} s')} "
                             f"| {fmt_bytes(peak) if peak else 'n/a (CPU)'} |")
            lines.append("")
        lines += ["Kernels that ran (linear layers):", ""]
        for r in rs:
            lines.append(f"- {r['name']}: " + ", ".join(f"{k} x{v}" for k, v in r.get("kernels", {}).items()))
        lines.append("")
        if "decode" in images:
            lines += [f"![decode speed]({images['decode']})", ""]
    lines += ["## Environment", "", "```", *(f"{k}: {v}" for k, v in env.items()), f"command: {data.get('command', '')}", "```", ""]
    return "\n".join(lines)


def plots(data: dict, stem: Path) -> dict[str, Path]:
    """PNG files beside the report; returns {'ppl': path, 'decode': path} for what the data supports."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = rows(data)
    made = {}
    pts = [r for r in rs if r.get("ppl") and r.get("size")]
    if pts:
        # one marker per point, named in a legend beside the axes: text labels next to points overlap once
        # there are ten or more of them
        fig, ax = plt.subplots(figsize=(9, 4.5))
        markers = "osD^v<>phX*P"
        colors = cast(Any, plt.get_cmap("tab10")).colors
        for i, r in enumerate(pts):
            ax.scatter(r["size"] / 2**20, r["ppl"], s=50, marker=markers[i % len(markers)], color=colors[i % len(colors)],
                       label=f"{r['label']}: {r['ppl']:.2f}, {r['size'] / 2**20:.0f} MiB")
        ax.set_xlabel("size on disk (MiB)")
        ppls = [r["ppl"] for r in pts]
        log = max(ppls) > 3 * min(ppls)  # one collapsed run (3-bit RTN) would flatten the others into a line
        if log:
            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_ylabel("perplexity (per token, lower is better" + (", log scale)" if log else ")"))
        ax.set_title("Perplexity vs size")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
        fig.tight_layout()
        made["ppl"] = stem.with_name(stem.name + "-ppl-size.png")
        fig.savefig(made["ppl"], dpi=120)
        plt.close(fig)
    speed = data["protocol"].get("speed")
    if speed:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = [r["label"] for r in rs]
        width = 0.8 / len(speed["batch_sizes"])
        for k, b in enumerate(speed["batch_sizes"]):
            ax.bar([i + k * width for i in range(len(rs))], [r.get(f"decode_b{b}") or 0 for r in rs], width, label=f"batch {b}")
        ax.set_xticks([i + width * (len(speed["batch_sizes"]) - 1) / 2 for i in range(len(rs))], names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("decode speed (tokens/s)")
        ax.set_title("Decode throughput")
        ax.legend()
        fig.tight_layout()
        made["decode"] = stem.with_name(stem.name + "-decode.png")
        fig.savefig(made["decode"], dpi=120)
        plt.close(fig)
    return made


def write_report(datas: list[dict], out: Path) -> list[Path]:
    """Write out (.md) and its PNGs; everything lands under a temporary name first, then is renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    parts, written = [], []
    for i, data in enumerate(datas):
        stem = out.with_suffix("") if len(datas) == 1 else out.with_name(f"{out.stem}-{i + 1}")
        tmp_stem = stem.with_name(stem.name + ".tmp")
        imgs = plots(data, tmp_stem)
        final = {k: stem.with_name(p.name.replace(tmp_stem.name, stem.name)) for k, p in imgs.items()}
        parts.append(markdown(data, {k: p.name for k, p in final.items()}))
        for k, p in imgs.items():
            p.replace(final[k])
            written.append(final[k])
    write_text(out, "\n\n".join(parts))
    return [out, *written]
