"""Where quantized checkpoints drift from the full-precision model: each layer's hidden-state error, per checkpoint.

    python tools/hidden_error.py --model /tmp/smollm2 --text /tmp/peer/evaluation.txt CKPT_A CKPT_B -o errors.json

Runs the full-precision model (in fp32) and every checkpoint (loaded by `quantool.load`, so any tool's) on the same
windows of the text (`quantool.text.windows`, as quantool draws calibration windows) and prints, per decoder layer,
the mean squared error of each checkpoint's hidden states against the full-precision model's, averaged over the
windows, and how far the worst window is above that mean (one window dominating a layer's error). The last row is
the final norm's output, which the LM head reads. A second table splits each layer's error between each window's
first token (from SmolLM2's layer 11 on, a token of ~24,000 in one channel) and the rest, each token's error divided
by its full-precision hidden state's mean square: the error the next RMSNorm sees, to first order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import quantool
from quantool import text


def hidden_states(model: torch.nn.Module, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """[layers + 1, windows, seq, hidden] in fp32: the embeddings, then each layer's output (the last one normed)."""
    out = []
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            states = model(ids[i:i + batch], output_hidden_states=True).hidden_states
            out.append(torch.stack([h.float() for h in states]))
    return torch.cat(out, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the full-precision model the checkpoints were quantized from")
    ap.add_argument("--text", required=True)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("-o", "--out", type=Path)
    ap.add_argument("checkpoints", nargs="+")
    args = ap.parse_args()
    fp, tok = quantool.load(args.model, device="cpu")
    ids = torch.stack(list(text.windows(text.tokenize(tok, text.read_text(args.text)), args.windows, args.seqlen, args.seed)))
    ref = hidden_states(fp.float(), ids, args.batch)
    del fp
    mean_square = ref[1:].pow(2).mean(-1)  # each token's, per layer: what the relative errors divide by
    errors = {}
    for path in args.checkpoints:
        model, _ = quantool.load(path, device="cpu")
        per_token = ((hidden_states(model, ids, args.batch) - ref) ** 2).mean(-1)[1:]  # [layers, windows, seq]
        per_window = per_token.mean(-1)
        relative = per_token / mean_square
        errors[path] = {"mse": per_window.mean(1).tolist(), "worst_window_ratio": (per_window.max(1).values / per_window.mean(1)).tolist(),
                        "relative_first_token": relative[:, :, 0].mean(1).tolist(), "relative_rest": relative[:, :, 1:].mean((1, 2)).tolist()}
        del model
    print("layer " + "".join(f"{Path(p).name[:30]:>34}" for p in args.checkpoints))
    for layer in range(len(ref) - 1):
        print(f"{layer:5d} " + "".join(f"{e['mse'][layer]:>20.4g} (worst {e['worst_window_ratio'][layer]:4.1f}x)" for e in errors.values()))
    print("relative error: first token / the rest")
    for layer in range(len(ref) - 1):
        print(f"{layer:5d} " + "".join(f"{e['relative_first_token'][layer]:>20.3g} / {e['relative_rest'][layer]:<11.3g}" for e in errors.values()))
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "text": args.text, "windows": args.windows, "seqlen": args.seqlen,
                                        "seed": args.seed, "torch": torch.__version__, "errors": errors}, indent=2) + "\n")


if __name__ == "__main__":
    main()
