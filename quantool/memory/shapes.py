"""Model shapes: the handful of numbers that decide a causal LM's memory, from a catalog, a config or a size."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from quantool.errors import QuantoolError


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer. Defaults follow Llama: gated MLP, RMSNorm, no biases."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int = 0
    tied: bool = False
    mlp: str = "gated"  # "gated" (gate/up/down) or "plain" (fc1/fc2)
    norm: str = "rms"  # "rms" (weight) or "layer" (weight + bias)
    norms_per_layer: int = 2
    bias: bool = False  # every linear has a bias (OPT, GPT-2)
    qkv_bias: bool = False  # only q/k/v have biases (Qwen2)
    experts: int = 0  # routed experts per MoE layer (0 = dense)
    experts_per_token: int = 0
    moe_layers: int = 0  # layers with experts (default: all, when experts); the others run a dense MLP of `intermediate`
    expert_intermediate: int = 0  # one routed expert's MLP width (default: intermediate)
    shared_intermediate: int = 0  # MoE layers' shared experts, their total MLP width (0: none)
    learned_positions: int = 0
    max_position: int = 0
    k_head_dim: int = 0  # width of one KV head's key in the cache (default head_dim; MLA in transformers: nope + rope)
    v_head_dim: int = 0  # width of one KV head's value in the cache (default head_dim)
    sliding_layers: int = 0  # layers whose KV cache keeps only the last `sliding_window` tokens
    sliding_window: int = 0
    dtype_bytes: int = 2  # bytes per weight as stored in the checkpoint (fp16/bf16; 4 for fp32 checkpoints)
    counted_params: int = 0  # counted on transformers' module graph (`memory.graph`); 0: from the formulas below
    counted_linear_params: int = 0  # the decoder layers' linear and expert weights, counted likewise
    counted_linear_rows: int = 0  # their output rows (bitsandbytes int8 keeps a scale per row)
    counted_linears: int = 0  # how many matrices they are
    quantized_linear_bytes: int = 0  # a quantized checkpoint's linears as stored (0: not quantized; see memory.graph)
    quantized_note: str = ""  # what they are, e.g. "GPTQ, 3.42 bits per weight on average"
    hf_id: str = ""
    note: str = ""
    aliases: tuple = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.experts and not self.moe_layers:
            object.__setattr__(self, "moe_layers", self.layers)
        for name, default in (("expert_intermediate", self.intermediate), ("k_head_dim", self.head_dim), ("v_head_dim", self.head_dim)):
            if not getattr(self, name):
                object.__setattr__(self, name, default)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of one dense decoder layer's linear layers (a MoE layer's experts have these
        MLP names at `expert_intermediate`)."""
        return {**self.attention_linears(), **self.mlp_linears(self.intermediate)}

    def attention_linears(self) -> dict[str, tuple[int, int]]:
        h = self.hidden
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim), "o_proj": (self.q_dim, h)}

    def mlp_linears(self, width: int) -> dict[str, tuple[int, int]]:
        h = self.hidden
        if self.mlp == "gated":
            return {"gate_proj": (h, width), "up_proj": (h, width), "down_proj": (width, h)}
        return {"fc1": (h, width), "fc2": (width, h)}

    def mlp_names(self) -> tuple[str, ...]:
        return ("gate_proj", "up_proj", "down_proj") if self.mlp == "gated" else ("fc1", "fc2")

    def copies(self, name: str) -> int:
        """How many instances of linear `name` a MoE layer holds: one per expert for the MLP's linears."""
        return max(self.experts, 1) if name in self.mlp_names() else 1

    def _params(self, linears: dict[str, tuple[int, int]], copies: int = 1) -> int:
        return copies * sum(i * o for i, o in linears.values())

    def dense_layer_linear_params(self) -> int:
        return self._params(self.linears())

    def moe_layer_unrouted_params(self) -> int:
        """Attention and the shared experts of one MoE layer: its linears outside the routed experts."""
        shared = self._params(self.mlp_linears(self.shared_intermediate)) if self.shared_intermediate else 0
        return self._params(self.attention_linears()) + shared

    def moe_layer_linear_params(self) -> int:
        """Attention, every routed expert and the shared experts of one MoE layer."""
        return self.moe_layer_unrouted_params() + self._params(self.mlp_linears(self.expert_intermediate), self.experts)

    def linear_params(self) -> int:
        """Weights of every decoder layer's linears and experts."""
        if self.counted_linear_params:
            return self.counted_linear_params
        return (self.layers - self.moe_layers) * self.dense_layer_linear_params() + self.moe_layers * self.moe_layer_linear_params()

    def linear_params_per_layer(self) -> int:
        """Weights of the quantizable linears of the largest layer (a MoE layer's: all its experts)."""
        if self.counted_linear_params:
            return self.counted_linear_params // self.layers
        return self.moe_layer_linear_params() if self.moe_layers else self.dense_layer_linear_params()

    def linear_rows(self) -> int:
        """Output rows of every decoder linear and expert matrix."""
        if self.counted_linear_rows:
            return self.counted_linear_rows
        rows = lambda linears, copies=1: copies * sum(o for _, o in linears.values())
        shared = rows(self.mlp_linears(self.shared_intermediate)) if self.shared_intermediate else 0
        moe = rows(self.attention_linears()) + rows(self.mlp_linears(self.expert_intermediate), self.experts) + shared
        return (self.layers - self.moe_layers) * rows(self.linears()) + self.moe_layers * moe

    def linear_count(self) -> int:
        """How many matrices the decoder layers hold (each expert's counted)."""
        if self.counted_linears:
            return self.counted_linears
        moe = 4 + self.experts * len(self.mlp_names()) + (len(self.mlp_names()) if self.shared_intermediate else 0)
        return (self.layers - self.moe_layers) * len(self.linears()) + self.moe_layers * moe

    def moe_mlp_width(self) -> int:
        """The MLP width a token passes through in a MoE layer: its experts' and the shared experts'."""
        return self.experts_per_token * self.expert_intermediate + self.shared_intermediate

    def small_params_per_layer(self) -> int:
        """Norms, biases and the MoE router: parameters outside the linear weights (of a dense layer)."""
        n = self.norms_per_layer * self.hidden * (2 if self.norm == "layer" else 1)
        if self.bias:
            n += sum(o for _, o in self.linears().values())
        elif self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        return n

    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.learned_positions * self.hidden

    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def final_norm_params(self) -> int:
        return self.hidden * (2 if self.norm == "layer" else 1)

    def param_count(self) -> int:
        if self.counted_params:
            return self.counted_params
        routers = self.moe_layers * self.hidden * self.experts
        return (self.linear_params() + self.layers * self.small_params_per_layer() + routers + self.embedding_params()
                + self.lm_head_params() + self.final_norm_params())

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        """One token's keys and values over every layer that caches all tokens (see sliding_layers)."""
        return self.kv_heads * (self.k_head_dim + self.v_head_dim) * dtype_bytes

    def describe(self) -> str:
        gqa = f"GQA {self.heads}/{self.kv_heads}" if self.kv_heads != self.heads else f"MHA {self.heads} heads"
        moe = (f", MoE {self.experts}x{self.expert_intermediate} top-{self.experts_per_token} in {self.moe_layers} layers"
               + (f" + shared {self.shared_intermediate}" if self.shared_intermediate else "") if self.experts else "")
        tie = "tied" if self.tied else "untied"
        return (f"{self.name}: {self.layers} layers, hidden {self.hidden}, MLP {self.intermediate} ({self.mlp}), "
                f"{gqa}, head_dim {self.head_dim}, vocab {self.vocab} ({tie}){moe}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelShape:
        """Inverse of to_dict (also reads catalog entries, whose aliases may be absent)."""
        return cls(**{**d, "aliases": tuple(d.get("aliases", ()))})


def _entries() -> list[dict]:
    return json.loads(resources.files("quantool.memory").joinpath("data/architectures.json").read_text())["models"]


def _catalog() -> dict[str, ModelShape]:
    """The catalog's entries given by their dimensions (no torch needed)."""
    shapes = {}
    for entry in _entries():
        if "config" in entry:
            continue
        shape = ModelShape.from_dict(entry)
        for key in (shape.name, *shape.aliases):
            shapes[key] = shape
    return shapes


def _catalog_configs() -> dict[str, dict]:
    """The catalog's entries given by their config.json (read through transformers)."""
    return {key: entry for entry in _entries() if "config" in entry for key in (entry["name"], *entry.get("aliases", ()))}


def catalog_names() -> list[str]:
    return sorted({e["name"] for e in _entries()})


def from_hf_config(cfg: dict, name: str = "config.json") -> ModelShape:
    """Read the shape from a Hugging Face config.json dict (Llama, Mistral, Qwen2, Gemma, Phi-3, OPT, GPT-2, Mixtral)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    get = lambda *keys, default=None: next((cfg[k] for k in keys if cfg.get(k) is not None), default)
    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = get("num_attention_heads", "n_head", "n_heads")
    vocab = get("vocab_size")
    missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers), ("num_attention_heads", heads), ("vocab_size", vocab)) if not v]
    if missing:
        raise QuantoolError(f"{name} is not a causal-LM config: missing {', '.join(missing)}")
    model_type = cfg.get("model_type", "")
    plain = model_type in ("opt", "gpt2", "gpt_neox", "falcon", "bloom", "gpt_bigcode")
    intermediate = get("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
    learned = {"opt": cfg.get("max_position_embeddings", 0) + 2, "gpt2": cfg.get("n_positions", 0)}.get(model_type, 0)
    return ModelShape(
        name=cfg.get("_name_or_path") or model_type or name,
        vocab=int(vocab), hidden=int(hidden), intermediate=int(intermediate), layers=int(layers), heads=int(heads),
        kv_heads=int(get("num_key_value_heads", default=heads)),
        head_dim=int(get("head_dim", default=hidden // heads)),
        tied=bool(cfg.get("tie_word_embeddings", True)),
        mlp="plain" if plain else "gated",
        norm="layer" if plain else "rms",
        norms_per_layer=4 if model_type.startswith("gemma2") or model_type.startswith("gemma3") else 2,
        bias=plain,
        qkv_bias=bool(cfg.get("attention_bias", False)) or model_type.startswith("qwen2"),
        experts=int(get("num_local_experts", "num_experts", default=0)),
        experts_per_token=int(get("num_experts_per_tok", default=0)),
        learned_positions=learned,
        max_position=int(get("max_position_embeddings", "n_positions", default=0)),
        dtype_bytes=4 if str(cfg.get("dtype") or cfg.get("torch_dtype")) == "float32" else 2,
    )


# Llama-family aspect ratios used when only a parameter count is given: (hidden, heads) by size.
_LADDER = [(0.3e9, 768, 12), (0.8e9, 1024, 16), (2e9, 2048, 16), (4.5e9, 3072, 24), (10e9, 4096, 32),
           (20e9, 5120, 40), (45e9, 6656, 52), (math.inf, 8192, 64)]


def from_param_count(n: int) -> ModelShape:
    """A Llama-shaped model of about n parameters: the nearest Llama catalog model if within 12%, else scaled."""
    llamas = [s for s in set(_catalog().values()) if s.name.startswith(("llama", "tinyllama"))]
    best = min(llamas, key=lambda s: abs(math.log(s.param_count() / n)))
    if abs(math.log(best.param_count() / n)) < math.log(1.12):
        return replace(best, note=f"--params {n:,}: assumed Llama-shaped, using {best.name}'s dimensions")
    _, hidden, heads = next(rung for rung in _LADDER if n <= rung[0])
    intermediate = 256 * math.ceil(8 * hidden / 3 / 256)
    kv_heads = 8 if hidden >= 8192 else heads
    probe = ModelShape("probe", 32000, hidden, intermediate, 1, heads, kv_heads)
    per_layer = probe.linear_params_per_layer() + probe.small_params_per_layer()
    layers = max(1, round((n - 2 * probe.embedding_params()) / per_layer))
    return ModelShape(f"llama-shaped-{n / 1e9:.3g}B", 32000, hidden, intermediate, layers, heads, kv_heads,
                      note=f"--params {n:,}: assumed Llama-shaped (vocab 32000, untied), scaled from Llama-2 ratios")


def from_config(cfg: dict, name: str) -> ModelShape:
    """A config.json's shape: counted on transformers' module graph where transformers knows the family
    (`memory.graph`), else from its dimensions by the formulas here. Either way the config must state its
    dimensions (transformers would fill in its own defaults, silently)."""
    from_hf_config(cfg, name)  # refuses a config without hidden size, layers, heads or vocabulary
    if cfg.get("model_type"):
        from quantool.memory.graph import shape_from_transformers

        try:
            return shape_from_transformers(cfg, name)
        except QuantoolError:
            shape = from_hf_config(cfg, name)
            return replace(shape, note=f"transformers does not know model_type {cfg['model_type']!r}: shape from the config's "
                                       f"dimensions, Llama-like where they say nothing")
    return from_hf_config(cfg, name)


def _data_bytes(folder: Path) -> int:
    """Bytes of tensor data in a folder's safetensors files (each file less its 8-byte length and JSON header)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as handle:
            total += f.stat().st_size - 8 - int.from_bytes(handle.read(8), "little")
    return total


def with_quantized_weights(shape: ModelShape, folder: Path, qcfg: dict) -> ModelShape:
    """The shape of a GPTQ/AWQ checkpoint: its linears take the bytes they are stored in (all the tensor data but
    the other parameters, stored in 16 bits)."""
    linear = _data_bytes(folder) - 2 * (shape.param_count() - shape.linear_params())
    bits = 8 * linear / max(shape.linear_params(), 1)
    return replace(shape, quantized_linear_bytes=linear,
                   quantized_note=f"{qcfg.get('quant_method', 'quantized').upper()} as stored, {bits:.2f} bits per weight with scales")


def _fetch_config(spec: str) -> dict:
    """config.json of a hub model (online; the cached copy offline)."""
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(spec, "config.json")).read_text())
    except Exception as exc:  # offline, unknown repo, gated model: one line says which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantoolError(f"cannot fetch {spec}/config.json from the hub ({first}): pass a local config.json or model "
                            f"directory, or a catalog name") from None


def resolve_model(spec: str) -> ModelShape:
    """A catalog name, a config.json path, a model directory, or a hub id (org/name)."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise QuantoolError(f"{spec} has no config.json: point --model at a Hugging Face model directory or config")
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise QuantoolError(f"config file {spec} does not exist")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise QuantoolError(f"{path} is not valid JSON ({exc.__class__.__name__}: {exc}): fix the file or use a catalog name") from None
        if not isinstance(cfg, dict):
            raise QuantoolError(f"{path} does not hold a JSON object: expected a Hugging Face config.json")
        shape = from_config(cfg, str(path))
        qcfg = cfg.get("quantization_config") or {}
        if qcfg.get("quant_method") in ("gptq", "awq") and any(path.parent.glob("*.safetensors")):
            shape = with_quantized_weights(shape, path.parent, qcfg)
        return shape
    catalog, configs = _catalog(), _catalog_configs()
    by_hub_id = {e["hf_id"].lower(): e["name"] for e in _entries() if e.get("hf_id")}
    key = by_hub_id.get(spec.lower(), spec.lower().split("/")[-1])
    if key in catalog:
        return catalog[key]
    if key in configs:
        entry = configs[key]
        return replace(from_config(dict(entry["config"]), entry["name"]), name=entry["name"], hf_id=entry["hf_id"])
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return from_config(_fetch_config(spec), spec)
    close = difflib.get_close_matches(key, [*catalog, *configs], n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(catalog_names())}"
    raise QuantoolError(f"unknown model {spec!r}: {hint} (or pass a config.json / model directory)")
