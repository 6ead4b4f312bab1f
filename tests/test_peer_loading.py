"""Our GPTQ/AWQ checkpoints load in the field's loader: transformers + GPT-QModel (optional peer).

Skipped where GPT-QModel is not installed (it is not a dependency); the committed record of a run is
reports/peer-load-gptqmodel.json."""

import pytest
import torch

import quantool
from quantool.ptq import PTQConfig, quantize_model

from conftest import make_tiny_llama

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")


@pytest.mark.parametrize("cfg", [dict(method="gptq", bits=4, order="act"), dict(method="gptq", bits=3),
                                 dict(method="gptq", bits=4, sym=False), dict(method="awq", bits=4)],
                         ids=["gptq4-actorder", "gptq3", "gptq4-asym", "awq4"])
def test_transformers_loads_our_checkpoint(tmp_path, story_text, cfg):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(tmp_path / "m", hidden=128, intermediate=256)
    calib = tmp_path / "c.txt"
    calib.write_text(story_text[:30000])
    out = tmp_path / "q"
    quantize_model(str(model), out, PTQConfig(group_size=32, calib=str(calib), nsamples=4, seqlen=64, device="cpu", **cfg))
    ours, _ = quantool.load(out)
    peer = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float16)
    ids = torch.randint(3, 512, (1, 32))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), peer(ids).logits.float()
    assert float((a - b).abs().max() / a.abs().max()) < 0.02
