"""Post-training quantization of a Hugging Face causal LM: RTN, GPTQ and AWQ layer by layer (with resume),
int8 and NF4 through bitsandbytes. Writes the checkpoint into OUT.partial/ and renames it to OUT at the end."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from quantool import workdir
from quantool.errors import QuantoolError
from quantool.formats import packed
from quantool.formats.packed import QuantizedWeight
from quantool.model import calibration
from quantool.model.layerwise import capture_inputs, record_call, record_inputs, run_layer, to_device
from quantool.model.structure import decoder_layers, map_layer, norm_offset
from quantool.quant.awq_clip import apply_clip, search_clip
from quantool.quant.awq_scale import activation_scale, search_scale
from quantool.quant.gptq import Hessian, gptq_quantize
from quantool.quant.quantizer import QuantSpec, quantize_groups

METHODS = ("rtn", "gptq", "awq", "int8", "nf4")


@dataclass
class PTQConfig:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    damp: float = 0.01
    duo_scaling: bool = False
    clip: bool = True
    calib: str | None = None
    nsamples: int = 128
    seqlen: int = 512
    device: str = "auto"
    seed: int = 0

    def spec(self) -> QuantSpec:
        sym = self.sym and self.method != "awq"  # AWQ is asymmetric (zero point), as in llm-awq
        return packed.spec_for(self.format(), self.bits, self.group_size, sym)

    def format(self) -> str:
        return "awq" if self.method == "awq" and self.bits == 4 else "gptq"

    def validate(self) -> "PTQConfig":
        if self.method not in METHODS:
            raise QuantoolError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method in ("rtn", "gptq", "awq"):
            self.spec().validate((3, 4) if self.method == "awq" else (2, 3, 4, 8))
        if self.nsamples < 1 or self.seqlen < 8:
            raise QuantoolError("--nsamples must be >= 1 and --seqlen >= 8")
        if self.static_groups and not self.act_order:
            raise QuantoolError("--static-groups only matters with --act-order")
        return self


@dataclass
class LayerReport:
    index: int
    seconds: float
    errors: dict[str, float] = field(default_factory=dict)  # relative output error per linear
    notes: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QuantoolError("--device cuda asked for, but no CUDA GPU is visible: use --device cpu")
    return torch.device(name)


def check_source(model_path: str):
    path = Path(model_path)
    if path.exists() and not (path / "config.json").exists():
        raise QuantoolError(f"{model_path} has no config.json: pass a Hugging Face model directory")
    if not path.exists() and (model_path.startswith((".", "/")) or model_path.count("/") != 1):
        raise QuantoolError(f"model {model_path} not found: pass a local model directory or a hub id like org/name")


def load_source(model_path: str, dtype=torch.float32, **kwargs):
    """Model + tokenizer from a local HF directory (or a hub id when online)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_source(model_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise QuantoolError(f"cannot load {model_path} as a causal LM: {first}") from None
    return model, tokenizer


def quantize_model(model_path: str, out: str | Path, cfg: PTQConfig, overwrite: bool = False, resume: bool = False,
                   on_layer: Callable[[LayerReport, int], None] | None = None, log: Callable[[str], None] = print) -> dict:
    cfg.validate()
    out = Path(out)
    device = resolve_device(cfg.device)
    check_source(model_path)
    work = workdir.prepare(out, overwrite, resume)
    start = time.perf_counter()
    with workdir.discard_unless_started(work, "progress.json"):
        if cfg.method in ("int8", "nf4"):
            summary = _bnb(model_path, work, cfg, device)
        else:
            model, tok, results, summary = quantize_layers(model_path, work, cfg, device, resume, on_layer or (lambda r, n: None))
            write_checkpoint(work / "checkpoint", model, tok, results, cfg, log)
    summary["unpacked_linears"] = _unpacked(summary, work / "checkpoint")
    summary["seconds"] = time.perf_counter() - start
    summary["device"] = str(device)
    ckpt = work / "checkpoint"
    (ckpt / "quantool.json").write_text(json.dumps({"config": asdict(cfg), "source": str(model_path), **summary}, indent=2))
    workdir.publish(work, out)
    summary["size_after"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return summary


def _bnb(model_path: str, work: Path, cfg: PTQConfig, device: torch.device) -> dict:
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QuantoolError("int8/nf4 need bitsandbytes: pip install 'quantool[bnb]'") from None
    compute = torch.bfloat16
    qc = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0) if cfg.method == "int8" else
          BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute))
    model, tok = load_source(model_path, dtype=torch.float16, quantization_config=qc, device_map={"": str(device)})
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # keep the stored NF4 weights exact on AVX512-BF16 CPUs
    ckpt = work / "checkpoint"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    n = sum(1 for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)))
    return {"method": cfg.method, "layers": [], "quantized_linears": n, "format": f"bitsandbytes-{cfg.method}"}


def _save_layer(work: Path, index: int, layer, results: dict[str, QuantizedWeight], x: torch.Tensor, report: LayerReport,
                cfg_dict: dict):
    """The layer's quantized linears and its other parameters (AWQ rescales norms), then the next inputs."""
    state = {k: v.detach().cpu() for k, v in layer.state_dict().items()}
    torch.save({"quantized": {k: asdict(v) for k, v in results.items()}, "state": state}, work / f"layer_{index:04d}.pt")
    torch.save(x, work / "inputs.tmp")
    (work / "inputs.tmp").replace(work / "inputs.pt")
    state = {"done": index, "config": cfg_dict, "reports": _load_progress(work).get("reports", []) + [asdict(report)]}
    (work / "progress.tmp").write_text(json.dumps(state))
    (work / "progress.tmp").replace(work / "progress.json")


def _load_progress(work: Path) -> dict:
    p = work / "progress.json"
    return json.loads(p.read_text()) if p.exists() else {}


def quantize_layers(model_path, work: Path, cfg: PTQConfig, device, resume: bool = False, on_layer=lambda r, n: None):
    """Quantize every decoder layer in turn, saving each layer's result in work/ for --resume.

    Returns (model with dequantized weights, tokenizer, {linear name: QuantizedWeight}, summary).
    """
    work.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, tok = load_source(model_path, dtype=dtype)
    model.eval()
    prefix, layers = decoder_layers(model)
    spec = cfg.spec()
    cfg_dict = asdict(cfg)
    progress = _load_progress(work) if resume else {}
    if progress and progress["config"] != cfg_dict:
        raise QuantoolError(f"{work} was started with other settings; rerun with the same options, or --overwrite to start over")
    done = progress.get("done", -1)
    seqlen = min(cfg.seqlen, getattr(model.config, "max_position_embeddings", cfg.seqlen) or cfg.seqlen)
    ids = calibration.tokenize(tok, calibration.read_text(cfg.calib))
    samples = calibration.windows(ids, cfg.nsamples, seqlen, cfg.seed)
    if cfg.method == "rtn":
        samples = samples[:1]
    x, kwargs = capture_inputs(model, layers, samples if done < 0 else samples[:1], device)
    if done >= 0:
        x = torch.load(work / "inputs.pt")
    layer0 = layers[0].to(device)
    lmap = map_layer(layer0, (x[:1].to(device),), to_device(kwargs, device))
    layers[0].to("cpu")
    if not lmap.linears:
        raise QuantoolError(f"no nn.Linear found in {type(layers[0]).__name__}: cannot quantize this architecture")
    if cfg.method == "awq" and not lmap.pairs:
        raise QuantoolError(f"AWQ found no norm->linear or linear->linear pairs in {type(layers[0]).__name__} "
                            f"(linears: {', '.join(lmap.linears)}): use gptq or rtn for this architecture")
    results: dict[str, QuantizedWeight] = {}
    reports = [LayerReport(**r) for r in progress.get("reports", [])]
    for i, layer in enumerate(layers):
        if i <= done:
            saved = torch.load(work / f"layer_{i:04d}.pt")
            layer.load_state_dict(saved["state"])
            results.update({k: QuantizedWeight(**v) for k, v in saved["quantized"].items()})
            continue
        t0 = time.perf_counter()
        layer.to(device)
        if cfg.method == "gptq":
            layer_results, report, x = _gptq_layer(layer, lmap, x, kwargs, spec, cfg, device)
        elif cfg.method == "awq":
            layer_results, report, x = _awq_layer(layer, lmap, x, kwargs, spec, cfg, device)
        else:
            layer_results, report = _rtn_layer(layer, lmap, spec)
        layer.to("cpu")
        report.index, report.seconds = i, time.perf_counter() - t0
        named = {f"{prefix}.{i}.{n}": r for n, r in layer_results.items()}
        results.update(named)
        _save_layer(work, i, layer, named, x, report, cfg_dict)
        reports.append(report)
        on_layer(report, len(layers))
    errors = [e for r in reports for e in r.errors.values()]
    summary = {"method": cfg.method, "format": cfg.format(), "layers": [asdict(r) for r in reports], "quantized_linears": len(results),
               "mean_error": sum(errors) / len(errors) if errors else None,
               "calibration": calibration.DEFAULT if cfg.calib is None else cfg.calib, "seqlen": seqlen}
    return model, tok, results, summary


def write_checkpoint(ckpt: Path, model, tok, results: dict[str, QuantizedWeight], cfg: PTQConfig, log=print):
    """The packed checkpoint (GPTQ v1 or AWQ GEMM) with tokenizer and generation config."""
    ckpt.mkdir(parents=True, exist_ok=True)
    fmt = cfg.format()
    unpacked = [n for n, r in results.items() if not packed.packable(fmt, cfg.bits, r.q.shape[1], r.q.shape[0], r.g_idx)]
    if unpacked:
        log(f"{len(unpacked)} of {len(results)} linears have widths the packed {fmt} layout cannot hold; "
            f"stored as fp16 weights equal to their quantized values: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in unpacked}))}")
    qcfg = packed.quantization_config(fmt, cfg.bits, cfg.group_size, cfg.spec().sym, cfg.act_order, cfg.damp, cfg.static_groups, unpacked)
    packed.write(ckpt, model, results, fmt, qcfg, cfg.bits)
    tok.save_pretrained(ckpt)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(ckpt)


def _unpacked(summary: dict, ckpt: Path) -> list[str]:
    cfg = json.loads((ckpt / "config.json").read_text()).get("quantization_config", {})
    return sorted(packed.unpacked_modules(cfg)) if cfg.get("quant_method") in ("gptq", "awq") else []


def _relative_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor | None) -> float:
    """||(W - Q) X|| / ||W X|| through the Hessian (tr(D H D^T)), or the weight error without calibration."""
    d = (w - wq).double()
    if H is None:
        return float(d.norm() / w.double().norm().clamp(min=1e-30))
    H = H.double()
    return float(((d @ H) * d).sum().clamp(min=0).sqrt() / ((w.double() @ H) * w.double()).sum().clamp(min=1e-30).sqrt())


def _set_weight(module: torch.nn.Linear, w: torch.Tensor):
    module.weight.data.copy_(w.to(module.weight.dtype))


def _rtn_layer(layer, lmap, spec):
    results, report = {}, LayerReport(0, 0)
    for name in lmap.linears:
        mod = layer.get_submodule(name)
        q, scale, zero = quantize_groups(mod.weight.data.float(), spec)
        qw = QuantizedWeight(q, scale, zero, _g_idx(q.shape[1], scale.shape[0]), _bias(mod))
        report.errors[name] = _relative_error(mod.weight.data.float(), qw.dequantize(), None)
        _set_weight(mod, qw.dequantize())
        results[name] = qw
    return results, report


def _g_idx(in_f: int, groups: int) -> torch.Tensor:
    return (torch.arange(in_f) // (in_f // groups)).to(torch.int32)


def _bias(mod) -> torch.Tensor | None:
    return mod.bias.detach().to("cpu", torch.float16) if mod.bias is not None else None


def _gptq_layer(layer, lmap, x, kwargs, spec, cfg, device):
    results, report = {}, LayerReport(0, 0)
    groups = lmap.groups if cfg.true_sequential else [lmap.linears]
    for group in groups:
        mods = {n: layer.get_submodule(n) for n in group}
        hessians = {n: Hessian(m.in_features, device) for n, m in mods.items()}
        with record_inputs(mods, lambda n, inp: hessians[n].add(inp)):
            run_layer(layer, x, kwargs, device)
        for name, mod in mods.items():
            H = hessians[name].H
            res = gptq_quantize(mod.weight.data, H, spec, percdamp=cfg.damp, act_order=cfg.act_order, static_groups=cfg.static_groups)
            if res.damp != cfg.damp:
                report.notes.append(f"{name}: Cholesky failed at damp {cfg.damp}, used {res.damp}")
            report.errors[name] = _relative_error(mod.weight.data.float(), res.weight, H)
            _set_weight(mod, res.weight)
            results[name] = QuantizedWeight(res.q.cpu(), res.scale.cpu(), res.zero.cpu(), res.g_idx.cpu(), _bias(mod))
    return results, report, run_layer(layer, x, kwargs, device)


def _awq_layer(layer, lmap, x, kwargs, spec, cfg, device):
    """llm-awq `run_awq` for one layer: record inputs, search and fold scales, search clipping, quantize."""
    report = LayerReport(0, 0)
    linears = {n: layer.get_submodule(n) for n in lmap.linears}
    inputs: dict[str, list] = {n: [] for n in linears}
    calls = {p.inspect: {} for p in lmap.pairs}
    with record_inputs(linears, lambda n, inp: inputs[n].append(inp.detach())):
        with ExitStack() as stack:
            for name, store in calls.items():
                stack.enter_context(record_call(layer.get_submodule(name), store))
            y = run_layer(layer, x, kwargs, device)  # full-precision outputs feed the next layer
    feats = {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).float() for n, v in inputs.items()}
    for pair in lmap.pairs:
        consumers = [linears[n] for n in pair.consumers]
        inspect = layer.get_submodule(pair.inspect)
        original = [c.weight.data.clone() for c in consumers]
        reference = _replay(inspect, calls[pair.inspect])

        def run(ws, consumers=consumers, inspect=inspect, calls=calls[pair.inspect]):
            for c, w in zip(consumers, ws):
                _set_weight(c, w)
            return _replay(inspect, calls)

        s, info = search_scale(activation_scale(feats[pair.consumers[0]]), original, run, reference, spec, duo=cfg.duo_scaling)
        for c, w in zip(consumers, original):
            _set_weight(c, w.float() * s)
        _fold_into_producer(layer.get_submodule(pair.producer), s, feats[pair.consumers[0]])
        for n in pair.consumers:
            feats[n] = feats[n] / s
        report.notes.append(f"{pair.producer}->{'/'.join(pair.consumers)}: alpha {info['alpha']:.2f}, "
                            f"loss {info['loss']:.3g} (s=1: {info['loss_at_1']:.3g})")
    results = {}
    for name, mod in linears.items():
        w = mod.weight.data.float()
        if cfg.clip and name not in lmap.attention_qk:
            w = apply_clip(w, search_clip(w, feats[name], spec))
        q, scale, zero = quantize_groups(w, spec)
        qw = QuantizedWeight(q.cpu(), scale.cpu(), zero.cpu(), _g_idx(q.shape[1], scale.shape[0]), _bias(mod))
        H = Hessian(w.shape[1], w.device)
        H.add(feats[name][:: max(1, feats[name].shape[0] // 4096)])
        report.errors[name] = _relative_error(mod.weight.data.float(), qw.dequantize().to(w.device), H.H)
        _set_weight(mod, qw.dequantize())
        results[name] = qw
    return results, report, y


@torch.no_grad()
def _replay(module, store) -> torch.Tensor:
    outs = []
    for args, kwargs in store["calls"]:
        y = module(*args, **kwargs)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])


@torch.no_grad()
def _fold_into_producer(producer, s: torch.Tensor, x: torch.Tensor):
    """Divide the producer's output channels by s: a norm's weight (and bias), or a linear's rows."""
    if isinstance(producer, torch.nn.Linear):
        producer.weight.data.copy_((producer.weight.data.float() / s[:, None]).to(producer.weight.dtype))
    else:
        offset = norm_offset(producer, x[:4].to(producer.weight.dtype))
        producer.weight.data.copy_(((producer.weight.data.float() + offset) / s - offset).to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.data.copy_((producer.bias.data.float() / s).to(producer.bias.dtype))
