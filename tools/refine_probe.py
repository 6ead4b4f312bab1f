"""Decoder layers quantized and refined as the pipeline does it, at several settings (issue 23's measurements).

    python tools/refine_probe.py --model /tmp/smollm2 --layers 0-3 gptq:0 gptq:50:1:model gptq:50:1:layer rtn:50:1:model

Each setting METHOD:STEPS[:LR[:TARGET[:DTYPE]]] (DTYPE fp32 or bf16, the refine steps' autocast) runs the pipeline's step (`ptq.pipeline.quantize_and_refine`) on layers
FIRST..LAST in turn from their full-precision weights, on the calibration windows as the pipeline draws them,
the first layer's inputs from the full-precision model, each next layer's from the quantized one before it,
carrying the full-precision model's hidden states beside them. Prints each layer's output error (mean squared)
after the method and after refining, and at the end the relative squared error of the last layer's outputs
against the full-precision model's (what the layers' errors add up to), and the seconds each setting took.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch
from shared_data import WIKITEXT

from quantool.formats import LAYOUTS
from quantool.model.experts import eager_experts
from quantool.model.layerwise import run_layer
from quantool.model.source import ModelSource, open_weights
from quantool.model.structure import decoder_layers
from quantool.ptq.config import PTQConfig
from quantool.ptq.pipeline import DRIVERS, capture_calibration, layer_map, quantization_group, quantize_and_refine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", default="0", help="FIRST-LAST or one layer")
    ap.add_argument("--calib", default=str(WIKITEXT))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--mse", action="store_true", help="least-error group ranges for every method (rtn's default is min-max)")
    ap.add_argument("--half-range", action="store_true", help="the GPTQ reference's symmetric grid instead of the full range")
    ap.add_argument("settings", nargs="+", help="METHOD:STEPS[:LR[:TARGET[:DTYPE]]], e.g. rtn:50:1:model:bf16")
    args = ap.parse_args()
    first, last = (int(n) for n in (args.layers.split("-") * 2)[:2])
    device = torch.device("cpu")
    cfg = PTQConfig(method="gptq", bits=args.bits, group_size=args.group_size, calib=args.calib, nsamples=args.nsamples,
                    seqlen=args.seqlen, device="cpu", mse=args.mse or None,
                    full_range=not args.half_range)
    source = ModelSource(args.model)
    model, weights = open_weights(source, torch.float32, device, print)
    model.eval()
    eager_experts(model)
    prefix, layers = decoder_layers(model)
    x0, kwargs, _ = capture_calibration(source, model, prefix, layers, weights, cfg, device, print)
    for i in range(last + 1):
        weights.load(layers[i], f"{prefix}.{i}.")
        if i < first:
            x0 = run_layer(layers[i], x0, kwargs, device, cfg.chunk_tokens)
    group = quantization_group(layers, cfg, LAYOUTS["gptq"])
    fp = {i: copy.deepcopy(layers[i].state_dict()) for i in range(first, last + 1)}
    for setting in args.settings:
        parts = setting.split(":")
        method, steps, lr, target, dtype = parts + ["1", "model", "fp32"][len(parts) - 2:]  # the defaults of what is left out
        run = replace(cfg, method=method, refine=int(steps), refine_lr=float(lr), refine_target=target, refine_bf16=dtype == "bf16").validate()
        x, x_fp = x0, x0
        t0 = time.perf_counter()
        for i in range(first, last + 1):
            layer = layers[i]
            layer.load_state_dict(fp[i])
            lmap = layer_map(layer, x, kwargs, run, device, {})
            specs = {n: run.spec().with_group(group) for n in lmap.linears}
            if run.refine:
                _, report, x, model_fp = quantize_and_refine(layer, lmap, x, kwargs, specs, run, device, run.seed + i,
                                                             x_fp if run.model_targets else None)
                x_fp = x_fp if model_fp is None else model_fp
                r = report.refine
                print(f"  {setting} layer {i}: method {r['error_before']:.4g}, refined {r['error_after']:.4g} "
                      f"({r['error_after'] / r['error_before']:.2f}x, {'kept' if r['kept'] else 'not kept'})", flush=True)
            if not run.model_targets:  # the full-precision stream, for the final comparison
                layer.load_state_dict(fp[i])
                x_fp = run_layer(layer, x_fp, kwargs, device, cfg.chunk_tokens)
            if not run.refine:  # RTN passes no outputs on: run the rounded layer
                y = DRIVERS[method].quantize_layer(layer, lmap, x, kwargs, specs, run, device)[2]
                x = run_layer(layer, x, kwargs, device, cfg.chunk_tokens) if y is None else y
        rel = float((x - x_fp).square().sum() / x_fp.square().sum())
        print(f"{setting}: layers {first}-{last}, relative error of the last output {rel:.4g}, {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
