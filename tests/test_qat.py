"""QAT: straight-through gradients, loss goes down, the converted checkpoint reproduces the fake-quantized model."""

import json

import pytest
import torch
from click.testing import CliRunner

import quantool
from quantool.cli import main
from quantool.qat import FakeQuantLinear, QATConfig, attach, convert, fake_quantize_tokens, train
from quantool.quant.quantizer import QuantSpec


def test_fake_quant_linear_passes_gradients_to_weight_and_lora():
    lin = torch.nn.Linear(64, 16)
    fq = FakeQuantLinear(lin, QuantSpec(4, 32, True))
    x = torch.randn(4, 64, requires_grad=True)
    fq(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    lin2 = torch.nn.Linear(64, 16)
    lora = FakeQuantLinear(lin2, QuantSpec(4, 32, True), rank=4)
    lora(x).sum().backward()
    assert lin2.weight.grad is None and lora.lora_B.grad.abs().sum() > 0


def test_activation_fake_quant_is_straight_through():
    x = torch.randn(3, 64, requires_grad=True)
    y = fake_quantize_tokens(x)
    assert (y - x).abs().max() <= x.abs().amax(dim=-1).max() / 127
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("rank", [0, 4])
def test_converted_weights_equal_fake_quantized(tiny_llama, rank):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    cfg = QATConfig(bits=4, group_size=32, lora_rank=rank)
    names = attach(model, cfg)
    if rank:
        for n in names:
            torch.nn.init.normal_(model.get_submodule(n).lora_B, std=0.01)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        fake = model(ids).logits
        convert(model, names)
        real = model(ids).logits
    assert torch.allclose(fake, real, atol=1e-5)


def test_qat_lowers_loss_and_writes_checkpoint(tiny_llama, tmp_path, story_text):
    data = tmp_path / "train.txt"
    data.write_text(story_text[:60000])
    cfg = QATConfig(data=str(data), bits=4, group_size=32, steps=30, lr=3e-3, batch=4, seq=64, save_every=10, device="cpu")
    summary = train(str(tiny_llama), tmp_path / "out", cfg, log=lambda m: None)
    assert summary["loss_last"] < summary["loss_first"] - 0.2
    qcfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == 4 and qcfg["group_size"] == 32
    model, _ = quantool.load(tmp_path / "out")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    assert not (tmp_path / "out.partial").exists()


def test_qat_summary_evaluates_before_and_after_conversion(tiny_llama, tmp_path, story_text):
    """The evaluation hook runs before training, on the fake-quantized model and on the converted one; the last
    two agree (conversion stores what training saw), and the summary counts the tokens trained."""
    data = tmp_path / "train.txt"
    data.write_text(story_text[:60000])
    cfg = QATConfig(data=str(data), bits=4, group_size=32, steps=5, lr=3e-3, batch=2, seq=64, device="cpu")
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    seen = []

    def loss(model, tok):
        with torch.no_grad():
            seen.append(model(input_ids=ids, labels=ids).loss.item())
        return seen[-1]

    summary = train(str(tiny_llama), tmp_path / "out", cfg, eval_fn=loss, log=lambda m: None)
    assert len(seen) == 3 and [summary["ppl_before"], summary["ppl_fake_quant"], summary["ppl_after"]] == seen
    assert summary["ppl_fake_quant"] == pytest.approx(summary["ppl_after"], rel=1e-5)
    assert summary["ppl_before"] != summary["ppl_after"]
    assert summary["tokens_trained"] == 5 * 2 * 64 and summary["seconds"] > 0


def test_qat_resume_matches_uninterrupted(tiny_llama, tmp_path, story_text):
    data = tmp_path / "train.txt"
    data.write_text(story_text[:60000])
    cfg = QATConfig(data=str(data), steps=8, lr=1e-3, batch=2, seq=32, save_every=4, device="cpu")

    def crash(step, total, loss, tps):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(str(tiny_llama), tmp_path / "a", cfg, on_step=crash, log=lambda m: None)
    a = train(str(tiny_llama), tmp_path / "a", cfg, resume=True, log=lambda m: None)
    b = train(str(tiny_llama), tmp_path / "b", cfg, log=lambda m: None)
    assert a["loss_last"] == pytest.approx(b["loss_last"], rel=1e-5)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("extra,needle", [
    (["--bits", "5"], "--bits 5 is not supported"),
    (["--lora-alpha", "16"], "--lora-alpha needs --lora-rank"),
    (["--act-bits", "4"], "--act-bits 4"),
    (["--batch", "64", "--seq", "512"], "fewer than one batch"),
])
def test_qat_bad_input(tiny_llama, tmp_path, extra, needle):
    data = tmp_path / "d.txt"
    data.write_text("Once upon a time there was a little dog. " * 50)
    result = CliRunner().invoke(main, ["qat", str(tiny_llama), "--data", str(data), "-o", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.partial").exists()
