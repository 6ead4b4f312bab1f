"""Write (or delete) a model of a real model's shapes with random fp16 weights, for memory and speed benchmarks.

    python tools/make_random_model.py /tmp/llama7b-32 --layers 32                        # Llama-2-7B, 13.5 GB
    python tools/make_random_model.py /tmp/qwen3moe-4 --shape qwen3-30b-a3b --layers 4   # Qwen3-30B-A3B layers
    python tools/make_random_model.py /tmp/llama7b-32 --delete                           # remove what it wrote

The folder is an ordinary HF checkpoint: config.json, sharded safetensors with their index (tensor names as the
hub's checkpoint of that model has them, experts one tensor each), and a tokenizer copied from --tokenizer
(default: ../shared/models/stories260K, whose 512 ids fit any vocabulary). Weights are N(0, 0.02) and norms are
ones, so perplexity means nothing: only shapes, bytes and time do. A MARKER file names what was written, and
--delete removes only folders that carry it.
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
from shared_data import STORIES260K

MARKER = "RANDOM_WEIGHTS"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# each shape: its config.json (from the hub's, less the depth) and its decoder layer's tensors, name -> shape; "{e}"
# stands for every expert index
SHAPES: dict[str, dict] = {
    "llama2-7b": dict(
        config=dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                    rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu"),
        layer={"input_layernorm.weight": (4096,), "post_attention_layernorm.weight": (4096,),
               **{f"self_attn.{n}_proj.weight": (4096, 4096) for n in "qkvo"},
               "mlp.gate_proj.weight": (11008, 4096), "mlp.up_proj.weight": (11008, 4096), "mlp.down_proj.weight": (4096, 11008)}),
    "qwen3-30b-a3b": dict(
        config=dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                    mlp_only_layers=[], num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
                    attention_bias=False),
        layer={"input_layernorm.weight": (2048,), "post_attention_layernorm.weight": (2048,),
               "self_attn.q_proj.weight": (4096, 2048), "self_attn.k_proj.weight": (512, 2048), "self_attn.v_proj.weight": (512, 2048),
               "self_attn.o_proj.weight": (2048, 4096), "self_attn.q_norm.weight": (128,), "self_attn.k_norm.weight": (128,),
               "mlp.gate.weight": (128, 2048), "mlp.experts.{e}.gate_proj.weight": (768, 2048),
               "mlp.experts.{e}.up_proj.weight": (768, 2048), "mlp.experts.{e}.down_proj.weight": (2048, 768)}),
}


def tensor_shapes(shape: str, layers: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a model of `shape` with `layers` decoder layers."""
    cfg, layer = SHAPES[shape]["config"], SHAPES[shape]["layer"]
    h, v, experts = cfg["hidden_size"], cfg["vocab_size"], cfg.get("num_experts", 0)
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        for name, dims in layer.items():
            names = [name.format(e=e) for e in range(experts)] if "{e}" in name else [name]
            shapes |= {f"model.layers.{i}.{n}": dims for n in names}
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


def write(out: Path, shape: str, layers: int, tokenizer: Path, shard_bytes: int, seed: int) -> None:
    if not (tokenizer / "tokenizer_config.json").exists():
        raise SystemExit(f"no tokenizer at {tokenizer}: pass --tokenizer DIR (a model folder whose tokenizer to copy)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by tools/make_random_model.py; delete with --delete\n")
    config = dict(SHAPES[shape]["config"], num_hidden_layers=layers, tie_word_embeddings=False, torch_dtype="float16",
                  bos_token_id=1, eos_token_id=2)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out / name)
    shards, size = [[]], 0  # plan the shards from the shapes, then make and write one shard at a time
    for name, dims in tensor_shapes(shape, layers).items():
        nbytes = 2 * math.prod(dims)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        shard = {name: torch.ones(dims, dtype=torch.float16) if len(dims) == 1 else
                 (torch.randn(dims, generator=gen) * 0.02).to(torch.float16) for name, dims in names}
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in shard}
        total += sum(t.nbytes for t in shard.values())
        print(f"  {file}: {len(shard)} tensors", file=sys.stderr)
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {out}: {shape}, {layers} layers, {total / 2**30:.2f} GiB in {len(shards)} shards", file=sys.stderr)


def delete(out: Path) -> None:
    if not (out / MARKER).exists():
        sys.exit(f"{out} has no {MARKER} file: not written by this script, not deleting")
    shutil.rmtree(out)
    print(f"deleted {out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokenizer", type=Path, default=STORIES260K)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delete", action="store_true")
    args = ap.parse_args()
    if args.delete:
        delete(args.out)
    else:
        write(args.out, args.shape, args.layers, args.tokenizer, int(args.shard_gb * 2**30), args.seed)


if __name__ == "__main__":
    main()
