"""Quantization end to end: checkpoints written, reloaded bit for bit, resumable; quality on the real model."""

import json

import pytest
import torch
from click.testing import CliRunner

import quantool
from quantool.cli import main
from quantool.eval.perplexity import perplexity
from quantool.model.calibration import tokenize
from quantool.ptq import PTQConfig, quantize_layers, quantize_model, write_checkpoint
from quantool.qlinear import QuantLinear

from conftest import TINYSTORIES


def calib_file(tmp_path, text):
    path = tmp_path / "calib.txt"
    path.write_text(text[: len(text) // 2])
    return str(path)


@pytest.mark.parametrize("method,bits,extra", [("rtn", 4, {}), ("gptq", 4, {"act_order": True}), ("gptq", 3, {}),
                                               ("gptq", 4, {"sym": False}), ("awq", 4, {}), ("awq", 3, {})])
def test_reload_is_bit_exact(tiny_llama, tmp_path, story_text, method, bits, extra):
    cfg = PTQConfig(method=method, bits=bits, group_size=32, calib=calib_file(tmp_path, story_text), nsamples=4, seqlen=64, device="cpu", **extra)
    model, tok, results, _ = quantize_layers(str(tiny_llama), tmp_path / "work", cfg, torch.device("cpu"))
    write_checkpoint(tmp_path / "ckpt", model, tok, results, cfg, log=lambda m: None)
    qcfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == cfg.format() and qcfg["bits"] == bits
    loaded, _ = quantool.load(tmp_path / "ckpt")
    n_quant = 0
    for name, qw in results.items():
        mod = loaded.get_submodule(name)
        assert isinstance(mod, QuantLinear), name  # every tiny-model width packs
        assert torch.equal(mod.q.int(), qw.q) and torch.equal(mod.scale, qw.scale) and torch.equal(mod.zero, qw.zero)
        assert torch.equal(mod.dequantized().float(), qw.dequantize())
        n_quant += 1
    assert n_quant == 2 * 7
    ids = torch.randint(0, 512, (1, 32))
    with torch.no_grad():  # the rest of the model (AWQ's rescaled norms included) is stored in fp16
        assert torch.allclose(loaded(ids).logits, model.float()(ids).logits, atol=2e-3)


def test_awq_checkpoint_layout(tiny_llama, tmp_path, story_text):
    out = tmp_path / "awq"
    quantize_model(str(tiny_llama), out, PTQConfig(method="awq", calib=calib_file(tmp_path, story_text), nsamples=4, seqlen=64, device="cpu"))
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    q = t["model.layers.0.mlp.down_proj.qweight"]
    assert q.dtype == torch.int32 and q.shape == (128, 64 // 8)
    assert t["model.layers.0.mlp.down_proj.scales"].shape == (1, 64) and t["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm", "modules_to_not_convert": None}


def test_gptq_checkpoint_layout(tiny_llama, tmp_path, story_text):
    out = tmp_path / "gptq"
    quantize_model(str(tiny_llama), out, PTQConfig(method="gptq", group_size=32, calib=calib_file(tmp_path, story_text), nsamples=4, seqlen=64, device="cpu"))
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.1.self_attn.q_proj.qweight"].shape == (64 * 4 // 32, 64)
    assert t["model.layers.1.self_attn.q_proj.qzeros"].shape == (2, 64 * 4 // 32)
    assert t["model.layers.1.self_attn.q_proj.g_idx"].tolist() == [i // 32 for i in range(64)]
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"
    config = json.loads((out / "config.json").read_text())
    assert config["use_cache"] is True  # calibration must not leave generate without its KV cache
    assert not (tmp_path / "gptq.partial").exists()


@pytest.mark.parametrize("method", ["gptq", "awq"])  # AWQ also rescales norms: those must survive a resume
def test_resume_after_interrupt_gives_identical_checkpoint(tiny_llama, tmp_path, story_text, method):
    cfg = PTQConfig(method=method, group_size=32, calib=calib_file(tmp_path, story_text), nsamples=4, seqlen=64, device="cpu")

    def crash(report, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(str(tiny_llama), tmp_path / "a", cfg, on_layer=crash)
    assert not (tmp_path / "a").exists()
    assert json.loads((tmp_path / "a.partial" / "progress.json").read_text())["done"] == 0
    with pytest.raises(quantool.errors.QuantoolError, match="--resume"):
        quantize_model(str(tiny_llama), tmp_path / "a", cfg)
    quantize_model(str(tiny_llama), tmp_path / "a", cfg, resume=True)
    quantize_model(str(tiny_llama), tmp_path / "b", cfg)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert not (tmp_path / "a.partial").exists()


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_bitsandbytes_roundtrip(tiny_llama, tmp_path, method):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / method
    quantize_model(str(tiny_llama), out, PTQConfig(method=method, device="cpu"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"})
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    ids = torch.randint(0, 512, (1, 16))
    fp = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        a, b = model(ids).logits.float(), fp(ids).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95


@pytest.mark.parametrize("args,needle", [
    (["rtn", "{model}", "-o", "{tmp}/x", "--bits", "5"], "--bits 5 is not supported"),
    (["awq", "{model}", "-o", "{tmp}/x", "--bits", "8"], "--bits 8 is not supported"),
    (["rtn", "{model}", "-o", "{tmp}/x", "--group-size", "48"], "power of two"),
    (["gptq", "{tmp}/nomodel", "-o", "{tmp}/x"], "not found"),
    (["gptq", "{tmp}", "-o", "{tmp}/x"], "has no config.json"),
    (["gptq", "{model}", "-o", "{tmp}/x", "--seqlen", "4096", "--calib", "{tmp}/short.txt"], "fewer than one window"),
    (["gptq", "{model}", "-o", "{tmp}/full"], "exists and is not empty"),
])
def test_quantize_bad_input(tiny_llama, tmp_path, args, needle):
    (tmp_path / "short.txt").write_text("Once upon a time.")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    argv = [a.format(model=tiny_llama, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.partial").exists()


def test_quality_on_real_model(shared_model, tmp_path):
    """4-bit g128 on stories260K, calibration on the first half of TinyStories-val, evaluation on the second."""
    text = TINYSTORIES.read_text()
    calib = calib_file(tmp_path, text)
    ppl = {}
    for method in ("fp", "rtn", "gptq", "awq"):
        if method == "fp":
            model, tok = quantool.load(shared_model)
        else:
            out = tmp_path / method
            quantize_model(str(shared_model), out, PTQConfig(method=method, calib=calib, nsamples=64, seqlen=512, device="cpu",
                                                              act_order=method == "gptq"))
            model, tok = quantool.load(out)
        ids = tokenize(tok, text)
        ppl[method] = perplexity(model, ids[ids.numel() // 2:], 512, max_tokens=60000)["ppl"]
    loss = {m: ppl[m] - ppl["fp"] for m in ("rtn", "gptq", "awq")}
    assert loss["rtn"] > 0
    assert loss["gptq"] < 0.75 * loss["rtn"], ppl
    assert loss["awq"] < 0.75 * loss["rtn"], ppl
