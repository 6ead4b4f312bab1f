"""Quantization-aware fine-tuning (QAT) ending in a real GPTQ-format checkpoint.

Linear weights are fake-quantized in the forward pass with a straight-through estimator (the PTQ
quantizer, `quant.quantizer.fake_quantize`), group-wise; inputs optionally fake-quantized per token to
int8. LoRA-QAT freezes the base and trains adapters A, B through fake_quantize(W + s * B A), so the merged
weight that is finally quantized is exactly what training saw (the idea of QA-LoRA / torchao's
"LoRA + fake quant", simplified)."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from quantool import __version__, text
from quantool.device import resolve_device
from quantool.errors import QuantoolError
from quantool.formats import LAYOUTS, LayoutConfig, ModuleQuant, gptq, model_group
from quantool.formats.checkpoint import checkpoint_tensors, finalize
from quantool.formats.shards import ShardedWriter
from quantool.model.source import ModelSource
from quantool.model.structure import decoder_layers
from quantool.quant.quantizer import QuantizedWeight, QuantSpec, fake_quantize
from quantool.util import faults, outdir
from quantool.util.atomic import torch_save
from quantool.util.config import opt


@dataclass
class QATConfig:
    data: str = opt("", "Training text (.txt or .jsonl).", cli=False)
    bits: int = opt(4, "Bits per weight of the converted checkpoint.")
    group_size: int = opt(32, "Columns per quantization group.")
    sym: bool = opt(True, "Symmetric or zero-point quantization.", flag="--sym/--asym")
    steps: int = opt(200, "Optimizer steps.")
    lr: float | None = opt(None, "Learning rate (default 1e-4 full, 1e-3 LoRA).", type=float)
    batch: int = opt(8, "Sequences per step.")
    seq: int = opt(256, "Tokens per sequence.")
    lora_rank: int = opt(0, "0: full QAT; R: LoRA-QAT with rank R (base frozen, adapters merged at the end).")
    lora_alpha: float | None = opt(None, "LoRA alpha (default 2 x rank).", type=float)
    act_bits: int | None = opt(None, "Also fake-quantize linear inputs per token (8).", type=int)
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup: int = opt(10, "Warm-up steps of the cosine schedule.")
    seed: int = opt(0, "Seed of the batch sampling and the adapters' initialization.")
    save_every: int = opt(50, "Save the training state (for --resume) every this many steps.")
    data_range: tuple[float, float] = opt((0.0, 1.0), "Fractions of --data's tokens to train on, e.g. 0,0.5.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1 ...")
    fake_quant: bool = opt(True, "--no-fake-quant: the control run, the same fine-tuning without fake quantization, "
                           "then the same final quantization.", flag="--fake-quant/--no-fake-quant")

    def spec(self) -> QuantSpec:
        return gptq.spec(self.bits, self.group_size, self.sym)  # the converted checkpoint's layout

    def validate(self) -> QATConfig:
        self.spec().validate()
        if self.act_bits not in (None, 8):
            raise QuantoolError(f"--act-bits {self.act_bits} is not supported: use 8 (dynamic per-token int8) or leave it off")
        if self.steps < 1 or self.batch < 1 or self.seq < 8:
            raise QuantoolError("--steps and --batch must be >= 1 and --seq >= 8")
        if self.lora_rank < 0:
            raise QuantoolError("--lora-rank must not be negative (0 = full QAT)")
        if self.lora_alpha is not None and self.lora_rank == 0:
            raise QuantoolError("--lora-alpha needs --lora-rank: full QAT trains every weight and has no adapters")
        lo, hi = self.data_range
        if not 0 <= lo < hi <= 1:
            raise QuantoolError(f"--data-range needs 0 <= start < end <= 1, got {lo},{hi}")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.lora_rank else 1e-4)


def fake_quantize_tokens(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-token fake quantization of activations, straight-through."""
    maxq = 2 ** (bits - 1) - 1
    scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / maxq
    return x + (torch.clamp(torch.round(x.detach() / scale), -maxq - 1, maxq) * scale - x).detach()


class FakeQuantLinear(nn.Module):
    """A linear whose effective weight fake_quantize(W [+ s B A]) is what the final checkpoint stores."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, rank: int = 0, alpha: float | None = None, act_bits: int | None = None,
                 enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self.weight = linear.weight
        self.bias = linear.bias
        self.spec, self.act_bits, self.rank = spec, act_bits, rank
        if rank:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
            self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, dtype=torch.float32, device=linear.weight.device))
            self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, dtype=torch.float32, device=linear.weight.device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.scaling = (alpha if alpha is not None else 2 * rank) / rank

    def merged(self) -> torch.Tensor:
        if not self.rank:
            return self.weight
        return self.weight + (self.scaling * self.lora_B @ self.lora_A).to(self.weight.dtype)

    def forward(self, x):
        if self.act_bits:
            x = fake_quantize_tokens(x, self.act_bits)
        w = fake_quantize(self.merged(), self.spec) if self.enabled else self.merged()
        return F.linear(x, w.to(x.dtype), self.bias)


def _group(model: nn.Module, cfg: QATConfig) -> int:
    """The group size the checkpoint's loaders can run for this model's decoder linears (`formats.model_group`)."""
    shapes = [(m.out_features, m.in_features) for m in decoder_layers(model)[1].modules() if isinstance(m, nn.Linear)]
    return model_group(LAYOUTS["gptq"], cfg.bits, shapes, cfg.group_size) or cfg.group_size


def attach(model: nn.Module, cfg: QATConfig) -> list[str]:
    """Swap every decoder-layer nn.Linear for a FakeQuantLinear; returns their names."""
    prefix, layers = decoder_layers(model)
    spec = cfg.spec().with_group(_group(model, cfg))
    names = []
    if cfg.lora_rank:
        for p in model.parameters():
            p.requires_grad_(False)
    for i, layer in enumerate(layers):
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, nn.Linear):
                layer.set_submodule(name, FakeQuantLinear(mod, spec, cfg.lora_rank, cfg.lora_alpha, cfg.act_bits, cfg.fake_quant))
                names.append(f"{prefix}.{i}.{name}")
    return names


@torch.no_grad()
def convert(model: nn.Module, names: list[str]) -> dict[str, QuantizedWeight]:
    """Quantize the merged weights for real and put plain nn.Linear back (with the dequantized weights)."""
    results = {}
    for name in names:
        fq: Any = model.get_submodule(name)
        w = fq.merged().detach().float()
        qw = QuantizedWeight.from_rtn(w, fq.spec, fq.bias.detach().cpu().half() if fq.bias is not None else None)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=fq.bias is not None, device=w.device, dtype=fq.weight.dtype)
        lin.weight.data.copy_(qw.dequantize().to(lin.weight))
        if fq.bias is not None:
            lin.bias.data.copy_(fq.bias.detach())
        model.set_submodule(name, lin)
        results[name] = qw
    return results


def _batches(ids: torch.Tensor, cfg: QATConfig, gen: torch.Generator):
    if ids.numel() < cfg.seq * cfg.batch + 1:
        raise QuantoolError(f"training text has {ids.numel()} tokens, fewer than one batch of {cfg.batch} x {cfg.seq}: "
                            f"give more --data or lower --batch/--seq")
    while True:
        starts = torch.randint(0, ids.numel() - cfg.seq, (cfg.batch,), generator=gen)
        yield torch.stack([ids[s:s + cfg.seq] for s in starts.tolist()])


def train(model_path: str, out: str | Path, cfg: QATConfig, eval_fn: Callable | None = None, overwrite: bool = False,
          resume: bool = False, on_step: Callable[[int, int, float, float], None] | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Fine-tune with fake quantization, convert, write OUT (GPTQ v1 layout). Returns a summary."""
    cfg.validate()
    if not Path(cfg.data).exists():
        raise QuantoolError(f"--data {cfg.data} does not exist: pass a .txt or .jsonl training text")
    out = Path(out)
    device = resolve_device(cfg.device)
    source = ModelSource(model_path)
    work, done = outdir.prepare(out, overwrite, resume)
    if done is not None:  # killed after publishing, while removing the working folder
        outdir.publish_done(work)
        return done
    model, tok = source.load_whole(torch.float32), source.tokenizer()
    with outdir.discard_unless_started(work, "train_state.pt"):
        summary = _train(model, tok, model_path, work, cfg, device, eval_fn, resume, on_step, log)
    outdir.publish(work, out, overwrite)
    return summary


def _train(model, tok, model_path, work: Path, cfg: QATConfig, device, eval_fn, resume, on_step, log) -> dict:
    model.to(device)
    eval_seconds = 0.0  # time spent evaluating, left out of the reported cost

    def evaluate():
        """Perplexity after training; its time is left out of the reported training cost."""
        nonlocal eval_seconds
        if eval_fn is None:
            return None
        t = time.perf_counter()
        ppl = eval_fn(model, tok)
        eval_seconds += time.perf_counter() - t
        return ppl

    before = eval_fn(model, tok) if eval_fn else None
    names = attach(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    ids = text.tokenize(tok, text.read_text(cfg.data))
    lo, hi = (int(f * ids.numel()) for f in cfg.data_range)
    ids = ids[lo:hi]
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    step, losses, prior = 0, [], 0.0
    state_path = work / "train_state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["config"] != asdict(cfg):
            raise QuantoolError(f"{work} was started with other settings; rerun with the same options, or --overwrite")
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step, losses, prior = state["step"], state["losses"], state["seconds"]
        log(f"resuming at step {step}")
    start_step = step
    batches = _batches(ids, cfg, gen)
    model.train()
    autocast = device.type == "cuda"
    t0 = time.perf_counter()  # the reported cost: training, conversion, writing

    def seconds() -> float:
        """Training time so far, the sessions before a resume included, evaluations excluded."""
        return prior + time.perf_counter() - t0 - eval_seconds

    while step < cfg.steps:
        x = next(batches).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
        if on_step:
            on_step(step, cfg.steps, losses[-1], (step - start_step) * cfg.batch * cfg.seq / (time.perf_counter() - t0))
        if step % cfg.save_every == 0 or step == cfg.steps:
            trainable = {k: v for k, v in model.state_dict().items() if k in {n for n, p in model.named_parameters() if p.requires_grad}}
            torch_save({"config": asdict(cfg), "model": trainable, "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "step": step, "losses": losses, "seconds": seconds()}, state_path)
            faults.point("qat.state")
    model.eval()
    fake_quant_after = evaluate()
    results = convert(model, names)
    after = evaluate()
    summary = {"method": "qat", "config": asdict(cfg), "source": str(model_path), "steps": step,
               "loss_first": sum(losses[:10]) / len(losses[:10]), "loss_last": sum(losses[-10:]) / len(losses[-10:]),
               "ppl_before": before, "ppl_fake_quant": fake_quant_after, "ppl_after": after,
               "seconds": seconds(), "device": str(device), "tokens_trained": step * cfg.batch * cfg.seq}
    meta = {"version": __version__, "run_id": outdir.run_id(work), **summary, "config": {**asdict(cfg), "method": "qat"}}
    _write(work / "checkpoint", model.to("cpu"), tok, results, cfg, meta, log)
    return summary


def _write(ckpt: Path, model: Any, tok, results: dict[str, QuantizedWeight], cfg: QATConfig, meta: dict, log) -> None:
    """The converted model as a GPTQ v1 checkpoint (a tied output head is stored once, as the embedding), written
    whole from the final training state: a resumed run writes it all again."""
    shutil.rmtree(ckpt, ignore_errors=True)
    state = model.state_dict()
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None:
        state.pop(next(n for n, m in model.named_modules() if m is head) + ".weight", None)
    tensors, unpacked = checkpoint_tensors(state, results, "gptq", cfg.bits)
    kinds: dict[str, set[str]] = {}
    for prefix, reason in unpacked.items():
        kinds.setdefault(reason, set()).add(prefix.rsplit(".", 1)[-1])
    for reason, names in kinds.items():
        log(f"{', '.join(sorted(names))}: the GPTQ layout cannot hold {reason}; stored as fp16 weights equal to their quantized values")
    writer = ShardedWriter(ckpt)
    writer.add(tensors)
    writer.finish()
    writer.publish_names()
    group = _group(model, cfg)
    if group != cfg.group_size:
        log(f"--group-size {cfg.group_size} does not divide every quantized width: every linear uses groups of {group}")
    modules = {name: ModuleQuant(cfg.bits, group) for name in results if name not in unpacked}
    lcfg = LayoutConfig(cfg.bits, group, cfg.spec().sym, modules=modules, unpacked=unpacked)
    finalize(ckpt, meta, model.config.to_dict(), "gptq", lcfg, tok, getattr(model, "generation_config", None))
