"""Write (or delete) a Llama-2-7B-shaped model with random fp16 weights, for memory and speed benchmarks.

    python tools/make_random_llama.py /tmp/llama7b-32 --layers 32      # the full 7B shape, 13.5 GB
    python tools/make_random_llama.py /tmp/llama7b-32 --delete         # remove what it wrote

The folder is an ordinary HF checkpoint: config.json, sharded safetensors with their index, and a
tokenizer copied from --tokenizer (default: ../shared/models/stories260K, whose 512 ids fit the 32000
vocabulary). Weights are N(0, 0.02) and norms are ones, so perplexity means nothing: only shapes, bytes
and time do. A MARKER file names what was written, and --delete removes only folders that carry it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

MARKER = "RANDOM_WEIGHTS"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
             max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a Llama-2-7B-shaped model with `layers` decoder layers."""
    h, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= {p + f"self_attn.{n}_proj.weight": (h, h) for n in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


def write(out: Path, layers: int, tokenizer: Path, shard_bytes: int, seed: int) -> None:
    if not (tokenizer / "tokenizer_config.json").exists():
        raise SystemExit(f"no tokenizer at {tokenizer}: pass --tokenizer DIR (a model folder whose tokenizer to copy)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by tools/make_random_llama.py; delete with --delete\n")
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=layers, hidden_act="silu",
                  tie_word_embeddings=False, torch_dtype="float16", bos_token_id=1, eos_token_id=2, **SHAPE)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out / name)
    shards, size = [[]], 0  # plan the shards from the shapes, then make and write one shard at a time
    for name, shape in tensor_shapes(layers).items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        shard = {name: torch.ones(shape, dtype=torch.float16) if len(shape) == 1 else
                 (torch.randn(shape, generator=gen) * 0.02).to(torch.float16) for name, shape in names}
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in shard}
        total += sum(t.nbytes for t in shard.values())
        print(f"  {file}: {len(shard)} tensors", file=sys.stderr)
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {out}: {layers} layers, {total / 2**30:.2f} GiB in {len(shards)} shards", file=sys.stderr)


def delete(out: Path) -> None:
    if not (out / MARKER).exists():
        sys.exit(f"{out} has no {MARKER} file: not written by this script, not deleting")
    shutil.rmtree(out)
    print(f"deleted {out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokenizer", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/models/stories260K")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delete", action="store_true")
    args = ap.parse_args()
    if args.delete:
        delete(args.out)
    else:
        write(args.out, args.layers, args.tokenizer, int(args.shard_gb * 2**30), args.seed)


if __name__ == "__main__":
    main()
