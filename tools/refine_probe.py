"""Decoder layers quantized and refined as the pipeline does it, at several settings (issue 23's measurements).

    python tools/refine_probe.py --model /tmp/smollm2 --layers 0-3 gptq:0 gptq:50:1:model gptq:50:1:layer rtn:50:1:model
    python tools/refine_probe.py --model /tmp/smollm2 --layers 11 --held-out 16 rtn:0 rtn:50:1:model:bf16:0 rtn:50:1:model:bf16:0.5

Each setting METHOD:STEPS[:LR[:TARGET[:DTYPE[:POWER]]]] (DTYPE fp32 or bf16, the refine steps' autocast; POWER
--refine-token-power, default 0.5) runs the pipeline's step (`ptq.pipeline.quantize_and_refine`) on layers
FIRST..LAST in turn from their full-precision weights, on the calibration windows as the pipeline draws them,
the first layer's inputs from the full-precision model, each next layer's from the quantized one before it,
carrying the full-precision model's hidden states beside them. Prints each layer's refine loss after the method
and after refining, and at the end the relative squared error of the last layer's outputs against the
full-precision model's (what the layers' errors add up to), and the seconds each setting took.

--held-out N draws the calibration windows from the text's first half only (`peer_benchmark.split_text`) and
runs the quantized layers on N windows of its second half: the last layer's error split between each window's first
token and the rest, raw (squared error per element) and relative to each token's full-precision mean square (the
error the next RMSNorm sees, to first order). --scale-range LO:HI sets the bounds of the learned scale multipliers
(`quant.rounding.SCALE_RANGE`) for the probe.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from shared_data import WIKITEXT

from quantool import text
from quantool.formats import LAYOUTS
from quantool.model.experts import eager_experts
from quantool.model.layerwise import capture_inputs, run_layer
from quantool.model.source import ModelSource, open_weights
from quantool.model.structure import decoder_layers
from quantool.ptq.config import PTQConfig
from quantool.ptq.pipeline import DRIVERS, capture_calibration, layer_map, quantization_group, quantize_and_refine
from quantool.quant import rounding

from peer_benchmark import split_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", default="0", help="FIRST-LAST or one layer")
    ap.add_argument("--calib", default=str(WIKITEXT))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="of the calibration (and held-out) window sampling")
    ap.add_argument("--mse", action="store_true", help="least-error group ranges for every method (rtn's default is min-max)")
    ap.add_argument("--half-range", action="store_true", help="the GPTQ reference's symmetric grid instead of the full range")
    ap.add_argument("--held-out", type=int, default=0, help="N: calibrate on the text's first half, measure on N windows of its second")
    ap.add_argument("--scale-range", help="LO:HI, the learned scale multipliers' bounds (default: quant.rounding.SCALE_RANGE)")
    ap.add_argument("settings", nargs="+", help="METHOD:STEPS[:LR[:TARGET[:DTYPE[:POWER]]]], e.g. rtn:50:1:model:bf16:0.5")
    args = ap.parse_args()
    first, last = (int(n) for n in (args.layers.split("-") * 2)[:2])
    if args.scale_range:
        rounding.SCALE_RANGE = tuple(float(b) for b in args.scale_range.split(":"))
    device = torch.device("cpu")
    source = ModelSource(args.model)
    model, weights = open_weights(source, torch.float32, device, print)
    model.eval()
    eager_experts(model)
    prefix, layers = decoder_layers(model)
    held = None
    with tempfile.TemporaryDirectory() as tmp:
        calib = args.calib
        if args.held_out:
            calib, evaluation = split_text(Path(args.calib), Path(tmp))
            ids = text.tokenize(source.tokenizer(), text.read_text(str(evaluation)))
            weights.load(model, "", weights.outside_keys(prefix))
            held = capture_inputs(model, layers, text.windows(ids, args.held_out, args.seqlen, args.seed, print), device)
        cfg = PTQConfig(method="gptq", bits=args.bits, group_size=args.group_size, calib=calib, nsamples=args.nsamples,
                        seqlen=args.seqlen, seed=args.seed, device="cpu", mse=args.mse or None, full_range=not args.half_range)
        x0, kwargs, _ = capture_calibration(source, model, prefix, layers, weights, cfg, device, print)
    for i in range(last + 1):
        weights.load(layers[i], f"{prefix}.{i}.")
        if i < first:
            x0 = run_layer(layers[i], x0, kwargs, device, cfg.chunk_tokens)
            if held:
                held = run_layer(layers[i], held[0], held[1], device, cfg.chunk_tokens), held[1]
    group = quantization_group(layers, cfg, LAYOUTS["gptq"])
    fp = {i: copy.deepcopy(layers[i].state_dict()) for i in range(first, last + 1)}
    held_fp = _through(layers[first:last + 1], *held, device, cfg.chunk_tokens) if held else None
    for setting in args.settings:
        parts = setting.split(":")
        method, steps, lr, target, dtype, power = parts + ["1", "model", "fp32", "0.5"][len(parts) - 2:]  # the defaults of what is left out
        run = replace(cfg, method=method, refine=int(steps), refine_lr=float(lr), refine_target=target, refine_bf16=dtype == "bf16",
                      refine_token_power=float(power)).validate()
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
        if held and held_fp is not None:
            err = (_through(layers[first:last + 1], *held, device, cfg.chunk_tokens) - held_fp).square().mean(-1)  # [windows, seq]
            relative = err / held_fp.square().mean(-1)
            print(f"{setting}: held out, raw first token {float(err[:, 0].mean()):.4g} rest {float(err[:, 1:].mean()):.4g}, "
                  f"relative first token {float(relative[:, 0].mean()):.3g} rest {float(relative[:, 1:].mean()):.3g}", flush=True)


def _through(layers: torch.nn.ModuleList, x: torch.Tensor, kwargs: dict, device: torch.device, tokens: int) -> torch.Tensor:
    """x through the layers as they are (full precision before any setting, a setting's quantized ones after it)."""
    for layer in layers:
        x = run_layer(layer, x, kwargs, device, tokens)
    return x


if __name__ == "__main__":
    main()
