"""Every model quantool writes runs: each format generates tokens on CPU through quantool.load and, for
bitsandbytes, through transformers; on models whose widths the kernels dislike (stories260K: 64-wide rows,
172-wide MLP; a model with 96- and 160-wide layers, which group 64 does not divide). The recorded config
tells the truth: group sizes the loaders can run, per-module overrides where they differ, and the modules
kept in 16 bits. (GPT-QModel's loading of the same checkpoints: tests/test_peer_loading.py.)"""

import json

import pytest
import torch

import quantool
from quantool.formats import LAYOUTS
from quantool.formats.qlinear import QuantLinear
from quantool.ptq import PTQConfig, quantize_model

from conftest import make_tiny_llama


def _generate(model, tokenizer, n: int = 4) -> torch.Tensor:
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    assert out.shape[1] == ids.shape[1] + n
    return out


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("odd") / "m", hidden=96, intermediate=160, layers=1)


@pytest.fixture(scope="module")
def calib(tmp_path_factory, story_text):
    path = tmp_path_factory.mktemp("calib") / "c.txt"
    path.write_text(story_text[:60000])
    return str(path)


CASES = [("stories", dict(method="rtn")), ("stories", dict(method="gptq")), ("stories", dict(method="awq", group_size=32)),
         ("stories", dict(method="gptq", group_size=32, order="act")), ("odd", dict(method="gptq", group_size=64)),
         ("odd", dict(method="rtn", group_size=64, bits=3)), ("odd", dict(method="awq", group_size=64)),
         ("odd", dict(method="rtn", group_size=32, bits=8))]


@pytest.mark.parametrize("which,settings", CASES, ids=[f"{w}-{'-'.join(map(str, s.values()))}" for w, s in CASES])
def test_layerwise_formats_generate(shared_model, odd_model, calib, tmp_path, which, settings):
    source = shared_model if which == "stories" else odd_model
    out = tmp_path / "q"
    notes = []
    cfg = PTQConfig(calib=calib, nsamples=8, seqlen=128, device="cpu", **settings)
    quantize_model(str(source), out, cfg, log=notes.append)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    layout = LAYOUTS[qcfg["quant_method"]]
    for kernel in ("dequant", "tinygemm"):
        model, tok = quantool.load(out, kernel=kernel)
        _generate(model, tok)
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                read = layout.module_settings(qcfg, name)
                assert read is not None and read.bits == m.bits == cfg.bits, name
                assert read.group_size == qcfg["group_size"] and m.in_features % read.group_size == 0, name  # the truth
                assert m.scale.shape[0] == m.in_features // read.group_size, name
    widths_divided = {"stories": 64, "odd": 32}[which]  # the largest power of two dividing every packable width
    assert qcfg["group_size"] == min(cfg.group_size, widths_divided)
    if qcfg["group_size"] != cfg.group_size:
        assert any(f"every linear uses groups of {qcfg['group_size']}" in n for n in notes), notes
    if which == "stories":  # the 172-wide MLP cannot be packed: kept, in the rules and in the kinds transformers reads
        assert any("mlp." in n and "stored as fp16" in n for n in notes), notes
        if qcfg["quant_method"] == "gptq":
            assert all(k.startswith("-:") for k in qcfg["dynamic"]), qcfg
            assert qcfg["modules_in_block_to_quantize"] == [[f"self_attn.{p}_proj" for p in "koqv"]], qcfg
        else:
            assert sorted(qcfg["modules_to_not_convert"]) == sorted(f"model.layers.{i}.mlp.{p}_proj" for i in range(5)
                                                                     for p in ("gate", "up", "down"))


def test_a_model_no_layout_can_hold_is_refused_at_the_start(tmp_path):
    """Every width off the layouts' 32-column grid: one line says so before any work."""
    from click.testing import CliRunner

    from quantool.cli import main

    model = make_tiny_llama(tmp_path / "m", hidden=72, intermediate=100, heads=4, kv_heads=2, layers=1)
    result = CliRunner().invoke(main, ["gptq", str(model), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "can hold none of this model's linears" in result.output, result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_bitsandbytes_formats_generate(shared_model, tmp_path, method):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    notes = []
    quantize_model(str(shared_model), out, PTQConfig(method=method, device="cpu"), log=notes.append)
    model, tok = quantool.load(out)
    _generate(model, tok)
    model = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"}, dtype=torch.float32)
    _generate(model, tok)
    if method == "nf4":  # stories260K's 172-wide MLP: bitsandbytes' 4-bit CPU kernel would assert at generate
        assert any("kept in 16 bits" in n for n in notes), notes
        assert type(model.get_submodule("model.layers.0.mlp.gate_proj")).__name__ == "Linear"
        assert type(model.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "Linear4bit"


def test_qat_output_generates(odd_model, calib, tmp_path):
    from quantool.qat import QATConfig, train

    out = tmp_path / "qat"
    train(str(odd_model), out, QATConfig(data=calib, steps=2, batch=2, seq=32, group_size=64, device="cpu"), log=lambda m: None)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["group_size"] == 32  # 96 and 160 wide: group 64 does not divide them, 32 does
    model, tok = quantool.load(out, kernel="tinygemm")
    _generate(model, tok)
