"""How few tokens can GPTQ learn from? The evidence for `--min-expert-tokens` (an expert that saw fewer is rounded
to nearest instead).

A MoE expert's Hessian comes from the tokens its router sent to it, which can be a handful. This takes a real
linear and its real inputs (SmolLM2-135M, layer 10's gate_proj on WikiText-2), builds GPTQ's Hessian from N
random input tokens, and measures the output error ||(W - Q) X|| on 4096 held-out tokens, against RTN's, for
several draws per N. Writes reports/expert-fallback.json.

    python tools/expert_fallback.py --model /tmp/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from shared_data import WIKITEXT

from quantool.model.source import ModelSource
from quantool.quant.gptq import Hessian, gptq_quantize
from quantool.quant.quantizer import QuantizedWeight, QuantSpec
from quantool.text import read_text, tokenize

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", default=str(WIKITEXT))
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "reports/expert-fallback.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    source = ModelSource(args.model)
    model = source.load_whole(torch.float32).eval()
    linear = model.model.layers[args.layer].mlp.gate_proj
    ids = tokenize(source.tokenizer(), read_text(args.text))[: 16 * 512].reshape(16, 512)
    seen = []
    handle = linear.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    handle.remove()
    x = torch.cat(seen)
    held, pool = x[:4096], x[4096:]
    w = linear.weight.data.float()
    spec = QuantSpec(4, 64, True, mse=True)

    def error(wq: torch.Tensor) -> float:
        return float(((w - wq) @ held.t()).norm() / (w @ held.t()).norm())

    rtn = error(QuantizedWeight.from_rtn(w, QuantSpec(4, 64, True)).dequantize())
    rtn_mse = error(QuantizedWeight.from_rtn(w, spec).dequantize())  # rounding with GPTQ's least-error ranges, no Hessian
    print(f"RTN {rtn:.4f}, RTN with least-error ranges {rtn_mse:.4f}", flush=True)
    rows = []
    for n in (1, 4, 16, 64, 256, 512, 1024, 1536, 2048, 4096):
        errors = []
        for d in range(args.draws):
            pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(d))[:n]
            h = Hessian(w.shape[1])
            h.add(pool[pick])
            errors.append(error(gptq_quantize(w, h.H, spec, order="group").weight))
        rows.append({"tokens": n, "gptq_error_median": statistics.median(errors), "gptq_errors": errors,
                     "gptq_over_rtn": statistics.median(errors) / rtn})
        print(f"{n:5d} tokens: GPTQ {statistics.median(errors):.4f} vs RTN {rtn:.4f} ({statistics.median(errors) / rtn:.2f}x)", flush=True)
    args.out.write_text(json.dumps({"what": __doc__.split("\n\n")[1], "model": str(args.model), "linear": f"model.layers.{args.layer}.mlp.gate_proj",
                                    "spec": "w4 g64 symmetric, GPTQ with least-error ranges and group order (quantool's defaults)",
                                    "rtn_error": rtn, "rtn_least_error_ranges_error": rtn_mse, "rows": rows, "held_out_tokens": 4096, "date": time.strftime("%Y-%m-%d"),
                                    "torch": torch.__version__, "python": platform.python_version()}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
