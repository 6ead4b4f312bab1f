"""Bench, report and recipes on a tiny model: files written whole, bad input refused in one line."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from quantool.cli import main
from quantool.errors import QuantoolError
from quantool.eval.bench import BenchConfig, read_results, run_bench
from quantool.eval.perplexity import windows
from quantool.recipes import load_recipe
from quantool.util.atomic import write_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_windows_cover_every_token_once():
    spans = windows(1000, 128, None)
    assert [b for b, _, _ in spans] == list(range(0, 1000 - 127, 128))
    sliding = windows(1000, 128, 64)
    scored = [t for _, e, first in sliding for t in range(first, e)]
    assert scored == list(range(1, 1000))


def test_perplexity_matches_plain_loop(tiny_llama, story_text):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantool.eval.perplexity import perplexity
    from quantool.text import tokenize

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = tokenize(AutoTokenizer.from_pretrained(tiny_llama), story_text)[:1000]
    ours = perplexity(model, ids, 128, batch=3)
    nll, n = 0.0, 0
    for b in range(0, 1000 - 127, 128):
        with torch.no_grad():
            out = model(ids[b:b + 128][None], labels=ids[b:b + 128][None])
        nll += float(out.loss) * 127
        n += 127
    assert ours["tokens"] == n
    assert ours["nll"] == pytest.approx(nll / n, rel=1e-5)


@pytest.fixture(scope="module")
def results(tiny_llama, tmp_path_factory, story_text):
    from quantool.ptq import PTQConfig, quantize_model

    tmp = tmp_path_factory.mktemp("bench")
    text = tmp / "eval.txt"
    text.write_text(story_text[:40000])
    q = tmp / "tiny-rtn"
    quantize_model(str(tiny_llama), q, PTQConfig(method="rtn", group_size=32, device="cpu"))
    cfg = BenchConfig(ppl=True, speed=True, text=str(text), ctx=128, max_tokens=2000, batch_sizes=(1, 2), prompt=16,
                      new_tokens=4, repeats=1, device="cpu")
    return run_bench([str(tiny_llama), str(q)], cfg)


def test_bench_results_and_kernels(results):
    base, quant = results["models"]
    assert base["baseline"] and base["method"] == "fp16" and quant["method"] == "rtn"
    assert quant["quant_seconds"] > 0 and base["quant_seconds"] is None
    assert base["ppl"]["tokens"] == quant["ppl"]["tokens"] > 0
    assert quant["kernels"].get("tinygemm (int4)") == 14  # every 4-bit linear of the tiny model runs packed
    for m in (base, quant):
        s = m["speed"]["by_batch"]["1"]
        assert s["decode_tokens_per_s"] > 0 and s["prefill_tokens_per_s"] > 0 and s["time_to_first_token_s"] > 0


@pytest.mark.parametrize("config, method", [({"method": "rtn", "refine": 0}, "rtn"),
                                            ({"method": "rtn", "refine": 50}, "rtn + refine 50"),
                                            ({"method": "gptq", "order": "group", "refine": 150}, "gptq (group order) + refine 150")])
def test_bench_names_the_method_and_its_refine_steps(tmp_path, config, method):
    """A refined checkpoint is named with its steps in results and reports, not as the plain method."""
    from quantool.eval.bench import describe_checkpoint

    write_json({"config": config, "seconds": 1.0, "version": "0.1.0"}, tmp_path / "quantool.json")
    assert describe_checkpoint(tmp_path)["method"] == method


def test_speed_runs_in_the_dtype_a_cpu_user_would_run(results):
    """bf16 where the CPU has bf16 units, else fp32 (never emulated fp16), recorded in the results and named in the
    report; a results file whose baseline dtype was emulated or not recorded gets no speed-up column."""
    from quantool.device import cpu_has_bf16
    from quantool.eval.report import markdown, rows

    speed = results["protocol"]["speed"]
    assert speed["dtype"] == ("bfloat16" if cpu_has_bf16() else "float32") and speed["dtype_native"]
    assert results["environment"]["cpu_bf16"] == cpu_has_bf16()
    assert rows(results)[1]["speedup_b1"] > 0 and f"Models ran in {speed['dtype']}" in markdown(results, {})
    emulated = {**results, "protocol": {**results["protocol"], "speed": {**speed, "dtype": "float16", "dtype_native": False}}}
    assert "speedup_b1" not in rows(emulated)[1]
    unrecorded = {**results, "protocol": {**results["protocol"], "speed": {k: v for k, v in speed.items()
                                                                              if k not in ("dtype", "dtype_native")}}}
    assert "speedup_b1" not in rows(unrecorded)[1] and "was not recorded" in markdown(unrecorded, {})


@pytest.mark.parametrize("make,needle", [(lambda p: None, "is not a model folder (no config.json)"),
                                         (lambda p: (p / "config.json").write_text("{}"), "holds no weights")])
def test_bench_on_a_folder_that_is_no_model(tmp_path, make, needle):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("x")
    make(folder)
    result = CliRunner().invoke(main, ["bench", str(folder), "-o", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and needle in result.output and "tokenizer" not in result.output, result.output


def test_report_markdown_and_plots(results, tmp_path):
    path = tmp_path / "results.json"
    write_json(results, path)
    out = tmp_path / "rep" / "r.md"
    result = CliRunner().invoke(main, ["report", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    md = out.read_text()
    assert "| tiny-rtn | rtn | 4 | 32 |" in md and "change vs fp16" in md and "tinygemm (int4) x14" in md
    for png in ("r-ppl-size.png", "r-decode.png"):
        assert (out.parent / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in md
    assert not list(out.parent.glob("*.tmp*"))


@pytest.mark.parametrize("content,needle", [
    ("{", "not valid JSON"),
    ('{"format": "quantool-results/0", "models": []}', "not a quantool-results/1"),
    ('{"format": "quantool-results/1", "models": [{"name": "x", "ppl": {"ppl": -1}}]}', "malformed perplexity"),
])
def test_report_rejects_bad_results(tmp_path, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = CliRunner().invoke(main, ["report", str(bad), "-o", str(tmp_path / "r.md")])
    assert result.exit_code == 2 and needle in result.output
    assert not (tmp_path / "r.md").exists()


def test_bench_text_too_short(tiny_llama, tmp_path):
    short = tmp_path / "s.txt"
    short.write_text("Once upon a time there was a cat.")
    result = CliRunner().invoke(main, ["bench", str(tiny_llama), "--text", str(short), "--ctx", "128", "-o", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "fewer than one window" in result.output
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_validate(recipe):
    r = load_recipe(RECIPES / recipe)
    assert r.quantize and r.name


@pytest.mark.parametrize("text,needle", [
    ("name: x\nquantize: [{method: gptq, bitz: 4}]\n", "unknown key(s) bitz"),
    ("name: x\nquantise: []\n", "unknown key(s) quantise"),
    ("name: x\nquantize: [{method: gptq, bits: 7}]\n", "--bits 7"),
    ("name: x\nbench: {ppl: true, spead: true}\n", "unknown key(s) spead"),
    ("- just a list\n", "must hold a mapping"),
    ("name: x\nquantize:\n  - {method: gptq\n", "r.yaml:4:1: not valid YAML"),
])
def test_recipe_validation(tmp_path, text, needle):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(QuantoolError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(path)


def test_run_recipe_end_to_end(tiny_llama, tmp_path, story_text):
    text = tmp_path / "eval.txt"
    text.write_text(story_text[:30000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: tiny\nquantize:\n  - {{method: rtn, bits: 4, group_size: 32}}\n"
                      f"bench: {{ppl: true, text: {text}, ctx: 128, max_tokens: 1000}}\nreport: {tmp_path}/out/{{name}}.md\n")
    result = CliRunner().invoke(main, ["run", str(recipe), str(tiny_llama), "--workdir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "tiny.md").exists()
    data = read_results(tmp_path / "runs" / "tiny.json")
    assert [m["method"] for m in data["models"]] == ["fp16", "rtn"] and data["recipe"] == "tiny"


def test_bench_refuses_models_that_tokenize_differently(tiny_llama, tmp_path, story_text):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.bos_token = tok.eos_token  # a different BOS id changes the evaluated token stream
    tok.save_pretrained(other)
    text = tmp_path / "eval.txt"
    text.write_text(story_text[:20000])
    with pytest.raises(QuantoolError, match="tokenizes the evaluation text differently"):
        run_bench([str(tiny_llama), str(other)], BenchConfig(text=str(text), ctx=128, max_tokens=500, device="cpu"))


def test_evaluator_scores_the_chosen_slice(tiny_llama, tmp_path, story_text):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantool.eval.perplexity import evaluator, perplexity
    from quantool.text import tokenize

    text = tmp_path / "eval.txt"
    text.write_text(story_text[:20000])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    evaluate = evaluator(str(text), (0.5, 1.0), ctx=128, max_tokens=1000)
    ids = tokenize(tok, text.read_text())
    expected = perplexity(model, ids[ids.numel() // 2:], 128, max_tokens=1000)["ppl"]
    assert evaluate(model, tok) == pytest.approx(expected)
    text.write_text("changed")  # tokenized once: later calls score the same tokens
    assert evaluate(model, tok) == pytest.approx(expected)
