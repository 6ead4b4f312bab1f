"""Our GPTQ/AWQ checkpoints load and generate in the field's loader: transformers + GPT-QModel (optional peer,
`pip install 'quantool[peer]'`), including widths its kernels dislike (a 96/160-wide model at groups 64 and 32,
stories260K's 64-wide rows and 172-wide MLP at the default group 128).

Skipped where GPT-QModel is not installed (it is not a dependency). With QUANTOOL_PEER_RECORD=FILE the run
writes its record there (reports/peer-load-gptqmodel.json is the committed one)."""

import json
import os
import platform
from pathlib import Path

import pytest
import torch

import quantool
from quantool.ptq import PTQConfig, quantize_model

from conftest import make_tiny_llama

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")
RESULTS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def record():
    yield
    path = os.environ.get("QUANTOOL_PEER_RECORD")
    if path:
        from importlib.metadata import version

        import transformers

        Path(path).write_text(json.dumps({
            "gptqmodel": version("gptqmodel"), "optimum": version("optimum"), "transformers": transformers.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "device": "cpu", "results": RESULTS,
            "what": "quantool checkpoints loaded by transformers.AutoModelForCausalLM.from_pretrained through GPT-QModel "
                    "(+ optimum) on CPU, fp16 compute, no missing keys; 4 tokens generated; logits compared with "
                    "quantool.load (fp32 compute): max_rel_logit_diff = max|a-b| / max|a|.",
            "reproduce": "QUANTOOL_PEER_RECORD=reports/peer-load-gptqmodel.json python -m pytest tests/test_peer_loading.py "
                         "(with gptqmodel and optimum installed)"}, indent=2))

CASES = [("tiny", dict(method="gptq", bits=4, order="act", group_size=32)), ("tiny", dict(method="gptq", bits=3, group_size=32)),
         ("tiny", dict(method="gptq", bits=4, sym=False, group_size=32)), ("tiny", dict(method="awq", bits=4, group_size=32)),
         ("odd", dict(method="gptq", bits=4, group_size=64)), ("odd", dict(method="awq", bits=4, group_size=32)),
         ("stories", dict(method="gptq", bits=4)), ("stories", dict(method="rtn", bits=8, group_size=32))]


@pytest.mark.parametrize("which,cfg", CASES, ids=[f"{w}-{'-'.join(map(str, c.values()))}" for w, c in CASES])
def test_transformers_loads_and_generates_our_checkpoint(tmp_path, story_text, shared_model, which, cfg):
    from transformers import AutoModelForCausalLM

    if which == "stories":
        model = shared_model
    else:
        model = make_tiny_llama(tmp_path / "m", **(dict(hidden=128, intermediate=256) if which == "tiny" else
                                                  dict(hidden=96, intermediate=160, layers=1)))
    calib = tmp_path / "c.txt"
    calib.write_text(story_text[:30000])
    out = tmp_path / "q"
    quantize_model(str(model), out, PTQConfig(calib=str(calib), nsamples=4, seqlen=64, device="cpu", **cfg))
    ours, _tok = quantool.load(out)
    peer, info = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float16, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]  # nothing initialized at random (modules the config skips)
    ids = torch.randint(3, 512, (1, 32))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), peer(ids).logits.float()
        generated = peer.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape[1] == 36
    diff = float((a - b).abs().max() / a.abs().max())
    RESULTS[f"{which}-" + "-".join(map(str, cfg.values()))] = {"peer_module": type(peer.get_submodule(
        "model.layers.0.self_attn.q_proj")).__name__, "max_rel_logit_diff": diff, "generated_tokens": 4}
    assert diff < 0.02


def test_gptqmodel_loads_our_moe_checkpoint(tmp_path, story_text):
    """A Qwen3-MoE GPTQ checkpoint (experts per expert, under the source's names) loads through GPT-QModel's own
    loader and computes what quantool.load computes. (transformers' from_pretrained path, through optimum, replaces
    only nn.Linear modules and cannot place experts that transformers 5 fuses: see docs/quantization.md.)"""
    from gptqmodel import GPTQModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from conftest import SHARED_MODEL

    config = AutoConfig.for_model("qwen3_moe", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=256,
                                  moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(SHARED_MODEL).save_pretrained(tmp_path / "m")
    calib = tmp_path / "c.txt"
    calib.write_text(story_text[:30000])
    quantize_model(str(tmp_path / "m"), tmp_path / "q", PTQConfig(method="gptq", group_size=32, calib=str(calib), nsamples=4, seqlen=64,
                                                                  device="cpu"))
    ours, _ = quantool.load(tmp_path / "q")
    peer = GPTQModel.load(str(tmp_path / "q"), device="cpu")
    ids = torch.randint(3, 512, (1, 32))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), peer.model(ids).logits.float()
    diff = float((a - b).abs().max() / a.abs().max())
    RESULTS["qwen3_moe-gptq-4-32 (GPTQModel.load)"] = {"peer_module": type(peer.model.get_submodule(
        "model.layers.0.self_attn.q_proj")).__name__, "max_rel_logit_diff": diff}
    assert diff < 0.02


def test_peer_loads_fit_mixed_widths(tmp_path, story_text):
    """quantool fit's checkpoint (per-module widths as GPT-QModel `dynamic` overrides) loads through GPT-QModel's
    loader with each module at its own width, and computes what quantool.load computes. (transformers'
    from_pretrained, through optimum, reads no `dynamic` rules: it would build every module at the default width.)"""
    from gptqmodel import GPTQModel

    from quantool.fit import FitConfig, fit
    from quantool.memory.job import Job

    model = make_tiny_llama(tmp_path / "m", hidden=128, intermediate=256, layers=3)
    calib = tmp_path / "c.txt"
    calib.write_text(story_text[:30000])
    ptq = PTQConfig(group_size=32, calib=str(calib), nsamples=4, seqlen=64, device="cpu")
    job = Job(seq=256, gen=16)
    peaks = [fit(str(model), None, FitConfig(candidates=(b,), budget="1TiB"), job, ptq, log=lambda m: None)["peak_bytes"] for b in (2, 8)]
    summary = fit(str(model), tmp_path / "q", FitConfig(budget=str(sum(peaks) // 2)), job, ptq, log=lambda m: None)
    assert len(set(summary["bits"].values())) > 1
    ours, _ = quantool.load(tmp_path / "q")
    peer = GPTQModel.load(str(tmp_path / "q"), device="cpu")
    for name, bits in summary["bits"].items():
        assert peer.model.get_submodule(name).bits == bits, name
    ids = torch.randint(3, 512, (1, 32))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), peer.model(ids).logits.float()
        assert peer.model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[1] == 36
    diff = float((a - b).abs().max() / a.abs().max())
    RESULTS["fit-mixed-" + "-".join(f"{b}x{n}" for b, n in sorted(summary["widths"].items())) + " (GPTQModel.load)"] = {
        "peer_module": type(peer.model.get_submodule("model.layers.0.self_attn.q_proj")).__name__, "max_rel_logit_diff": diff,
        "generated_tokens": 4}
    assert diff < 0.02
