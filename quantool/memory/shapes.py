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
    experts: int = 0  # MoE experts per layer (0 = dense)
    experts_per_token: int = 0
    learned_positions: int = 0
    max_position: int = 0
    hf_id: str = ""
    note: str = ""
    aliases: tuple = field(default=(), compare=False)

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of one decoder layer's linear layers, per expert for MoE."""
        h, i = self.hidden, self.intermediate
        shapes = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim), "o_proj": (self.q_dim, h)}
        if self.mlp == "gated":
            shapes.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        else:
            shapes.update(fc1=(h, i), fc2=(i, h))
        return shapes

    def mlp_names(self) -> tuple[str, ...]:
        return ("gate_proj", "up_proj", "down_proj") if self.mlp == "gated" else ("fc1", "fc2")

    def copies(self, name: str) -> int:
        """How many instances of linear `name` a layer holds: one per expert for MoE MLP linears."""
        return max(self.experts, 1) if name in self.mlp_names() else 1

    def linear_params_per_layer(self) -> int:
        """Weights of the quantizable linears of one layer (all experts)."""
        return sum(i * o * self.copies(name) for name, (i, o) in self.linears().items())

    def small_params_per_layer(self) -> int:
        """Norms, biases and the MoE router: parameters outside the linear weights."""
        n = self.norms_per_layer * self.hidden * (2 if self.norm == "layer" else 1)
        if self.bias:
            n += sum(o for _, o in self.linears().values())
        elif self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.experts:
            n += self.hidden * self.experts
        return n

    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.learned_positions * self.hidden

    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def final_norm_params(self) -> int:
        return self.hidden * (2 if self.norm == "layer" else 1)

    def param_count(self) -> int:
        per_layer = self.linear_params_per_layer() + self.small_params_per_layer()
        return self.layers * per_layer + self.embedding_params() + self.lm_head_params() + self.final_norm_params()

    def describe(self) -> str:
        gqa = f"GQA {self.heads}/{self.kv_heads}" if self.kv_heads != self.heads else f"MHA {self.heads} heads"
        moe = f", MoE {self.experts}x top-{self.experts_per_token}" if self.experts else ""
        tie = "tied" if self.tied else "untied"
        return (f"{self.name}: {self.layers} layers, hidden {self.hidden}, MLP {self.intermediate} ({self.mlp}), "
                f"{gqa}, head_dim {self.head_dim}, vocab {self.vocab} ({tie}){moe}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        """Inverse of to_dict (also reads catalog entries, whose aliases may be absent)."""
        return cls(**{**d, "aliases": tuple(d.get("aliases", ()))})


def _catalog() -> dict[str, ModelShape]:
    raw = json.loads(resources.files("quantool.memory").joinpath("data/architectures.json").read_text())
    shapes = {}
    for entry in raw["models"]:
        shape = ModelShape.from_dict(entry)
        for key in (shape.name, *shape.aliases):
            shapes[key] = shape
    return shapes


def catalog_names() -> list[str]:
    return sorted({s.name for s in _catalog().values()})


def from_hf_config(cfg: dict, name: str = "config.json") -> ModelShape:
    """Read the shape from a Hugging Face config.json dict (Llama, Mistral, Qwen2, Gemma, Phi-3, OPT, GPT-2, Mixtral)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    get = lambda *keys, default=None: next((cfg[k] for k in keys if cfg.get(k) is not None), default)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head")
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


def resolve_model(spec: str) -> ModelShape:
    """A catalog name, a config.json path, or a model directory."""
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
        return from_hf_config(cfg, str(path))
    catalog = _catalog()
    key = spec.lower().split("/")[-1]
    if key in catalog:
        return catalog[key]
    close = difflib.get_close_matches(key, list(catalog), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(catalog_names())}"
    raise QuantoolError(f"unknown model {spec!r}: {hint} (or pass a config.json / model directory)")
