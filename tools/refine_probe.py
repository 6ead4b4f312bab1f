"""One decoder layer, the method's output error and --refine's, at several settings (issue 23's measurements).

    python tools/refine_probe.py --model /tmp/smollm2-135m --layer 0 gptq:50:1 gptq:50:0.1 rtn:50:1 rtn:200:1

Each setting METHOD:STEPS:LR runs what the pipeline runs for that layer (`ptq.pipeline.quantize_and_refine`) from
the layer's full-precision weights, on the calibration windows as the pipeline draws them, with the inputs the
full-precision earlier layers give. Prints the layer's output error (mean squared, against the full-precision
layer on the same inputs) after the method and after refining, and the seconds refining took.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from quantool.formats import LAYOUTS
from quantool.model.experts import eager_experts
from quantool.model.layerwise import run_layer
from quantool.model.source import ModelSource, open_weights
from quantool.model.structure import decoder_layers
from quantool.ptq.config import PTQConfig
from quantool.ptq.pipeline import capture_calibration, layer_map, quantization_group, quantize_and_refine

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--calib", default=str(ROOT / "../shared/data/wikitext2_raw_test.txt"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("settings", nargs="+", help="METHOD:STEPS:LR, e.g. gptq:50:0.1")
    args = ap.parse_args()
    device = torch.device("cpu")
    cfg = PTQConfig(method="gptq", bits=args.bits, group_size=args.group_size, calib=args.calib, nsamples=args.nsamples,
                    seqlen=args.seqlen, device="cpu")
    source = ModelSource(args.model)
    model, weights = open_weights(source, torch.float32, device, print)
    model.eval()
    eager_experts(model)
    prefix, layers = decoder_layers(model)
    x, kwargs, _ = capture_calibration(source, model, prefix, layers, weights, cfg, device, print)
    for i in range(args.layer + 1):
        weights.load(layers[i], f"{prefix}.{i}.")
        if i < args.layer:
            x = run_layer(layers[i], x, kwargs, device, cfg.chunk_tokens)
    layer = layers[args.layer]
    lmap = layer_map(layer, x, kwargs, cfg, device, {})
    group = quantization_group(layers, cfg, LAYOUTS["gptq"])
    fp = copy.deepcopy(layer.state_dict())
    for setting in args.settings:
        method, steps, lr = setting.split(":")
        run = replace(cfg, method=method, refine=int(steps), refine_lr=float(lr)).validate()
        layer.load_state_dict(fp)
        specs = {n: run.spec().with_group(group) for n in lmap.linears}
        t0 = time.perf_counter()
        _, report, _ = quantize_and_refine(layer, lmap, x, kwargs, specs, run, device, seed=run.seed + args.layer)
        r = report.refine
        print(f"{setting}: method {r['error_before']:.4g}, refined {r['error_after']:.4g} ({r['error_after'] / r['error_before']:.2f}x, "
              f"{'kept' if r['kept'] else 'not kept'}), {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
