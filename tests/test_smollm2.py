"""Quality at realistic widths, on SmolLM2-135M (hidden 576, MLP 1536, 30 layers) from ../shared.

576 columns at group size 128 are four whole groups and a partial one of 64, which loaders cannot run: the
case a toy model never reaches. Calibration is the first half of WikiText-2 test, evaluation a slice of its
second half.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import quantool
from quantool.eval.perplexity import perplexity
from quantool.formats import LAYOUTS
from quantool.formats.checkpoint import weight_files
from quantool.formats.qlinear import QuantLinear
from quantool.ptq import PTQConfig, quantize_model
from quantool.quant.quantizer import QuantizedWeight
from quantool.text import tokenize

from conftest import SHARED

pytestmark = pytest.mark.slow
WIKITEXT = SHARED / "data" / "wikitext2_raw_test.txt"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf", reason="to_hf.py needs the gguf package (in the test extra)")
    out = tmp_path_factory.mktemp("smollm2") / "model"
    subprocess.run([sys.executable, str(SHARED / "models/smollm2-135m/to_hf.py"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    text = WIKITEXT.read_text()
    cut = text.rfind("\n", 0, len(text) // 2) + 1
    calib = tmp_path_factory.mktemp("text") / "calib.txt"
    calib.write_text(text[:cut])
    return str(calib), text[cut:]


@pytest.fixture(scope="module")
def checkpoints(smollm2, halves, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    out = {}
    for method in ("rtn", "gptq"):
        out[method] = root / method
        quantize_model(str(smollm2), out[method], PTQConfig(method=method, bits=4, group_size=128, calib=halves[0],
                                                             nsamples=16, seqlen=512, device="cpu"), log=lambda m: None)
    return out


def test_gptq_beats_rtn_by_a_margin(smollm2, halves, checkpoints):
    ppl = {}
    for name, path in {"fp16": smollm2, **checkpoints}.items():
        model, tok = quantool.load(path)
        ppl[name] = perplexity(model, tokenize(tok, halves[1]), 2048, max_tokens=8192)["ppl"]
    loss = {m: ppl[m] - ppl["fp16"] for m in checkpoints}
    assert loss["rtn"] > 0, ppl
    assert loss["gptq"] < 0.75 * loss["rtn"], ppl  # measured: GPTQ keeps about half of RTN's loss


def test_group_128_becomes_64_and_reloads_bit_exactly(checkpoints):
    """Every quantized linear, read back through quantool.load, packs again into exactly the stored tensors; group
    128 does not divide the 576-wide inputs, so every linear uses groups of 64 (which divides 576 and 1536), and
    the config says so."""
    path = checkpoints["gptq"]
    stored = {k: v for f in weight_files(path) for k, v in load_file(str(f)).items()}
    model, _ = quantool.load(path)
    layout = LAYOUTS["gptq"]
    assert json.loads((path / "config.json").read_text())["quantization_config"]["group_size"] == 64
    seen = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        w = QuantizedWeight(mod.q, mod.scale, mod.zero, mod.g_idx, None if mod.bias is None else mod.bias.data)
        for key, t in layout.pack(4, name, w).items():
            assert torch.equal(t, stored[key]), key
        assert torch.bincount(mod.g_idx.long()).tolist() == [64] * (mod.in_features // 64), name
        seen += 1
    assert seen == 30 * 7
