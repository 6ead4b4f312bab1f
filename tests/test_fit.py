"""quantool fit: the allocation against exhaustive search, the byte count against written files, the planned peak
against `quantool memory --model` on the written checkpoint, and the CLI's contract (--json, --dry-run, exit 2)."""

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import quantool
from quantool.cli import main
from quantool.formats import gptq as gptq_layout
from quantool.quant.allocate import Option, allocate

from conftest import make_tiny_llama


def _brute_force(items: list[list[Option]], budget: int) -> float | None:
    best = None
    for pick in itertools.product(*(range(len(o)) for o in items)):
        if sum(items[k][c].bytes for k, c in enumerate(pick)) <= budget:
            loss = sum(items[k][c].loss for k, c in enumerate(pick))
            best = loss if best is None else min(best, loss)
    return best


def test_allocation_is_near_the_exhaustive_optimum():
    """Random convex-ish problems (loss halving per extra bit, as quantization error does): the greedy on convex
    hulls is within one upgrade of the exact optimum, never over budget, and None only when nothing fits."""
    rng = random.Random(0)
    for trial in range(200):
        items = []
        for _ in range(rng.randint(1, 5)):
            size = rng.randint(10, 100)
            base = rng.uniform(0.1, 10)
            items.append([Option(size * b, base * 2.0 ** (-b * rng.uniform(0.8, 1.2))) for b in (2, 3, 4, 8)])
        least = sum(min(o.bytes for o in options) for options in items)
        most = sum(max(o.bytes for o in options) for options in items)
        budget = rng.randint(least - 50, most + 50)
        picked = allocate(items, budget)
        exact = _brute_force(items, budget)
        if exact is None:
            assert picked is None
            continue
        assert picked is not None
        assert sum(items[k][c].bytes for k, c in enumerate(picked)) <= budget
        loss = sum(items[k][c].loss for k, c in enumerate(picked))
        largest_step = max(max(o.loss for o in options) - min(o.loss for o in options) for options in items)
        assert exact <= loss + 1e-12 and loss <= exact + largest_step, (trial, loss, exact)


def test_allocation_takes_the_best_loss_per_byte_first():
    cheap_fix = [Option(10, 5.0), Option(20, 0.0)]  # 0.5 saved per byte
    costly_fix = [Option(10, 5.0), Option(110, 0.0)]  # 0.05 per byte
    assert allocate([cheap_fix, costly_fix], 125) == [1, 0]
    assert allocate([cheap_fix, costly_fix], 130) == [1, 1]
    assert allocate([cheap_fix, costly_fix], 19) is None


@pytest.fixture(scope="module")
def fit_model(tmp_path_factory):
    # widths where every candidate packs (in % 32 == 0) at group 32; 3 layers so the choice can differ per layer
    return make_tiny_llama(tmp_path_factory.mktemp("fit") / "m", hidden=128, intermediate=256, layers=3)


def _fit(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["fit", *args], catch_exceptions=False)
    return result.exit_code, result.output


COMMON = ["--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--seq", "256", "--gen", "16"]


def _uniform_peak(model: Path, bits: int, calib: Path) -> int:
    code, out = _fit([str(model), "--dry-run", "--json", "--bits", str(bits), "--budget", "1TiB", "--calib", str(calib), *COMMON])
    assert code == 0, out
    return json.loads(out)["peak_bytes"]


def test_fit_writes_what_it_planned(fit_model, tmp_path, story_text):
    calib = tmp_path / "c.txt"
    calib.write_text(story_text[:20000])
    lo, hi = _uniform_peak(fit_model, 2, calib), _uniform_peak(fit_model, 8, calib)
    assert lo < hi
    budget = (lo + hi) // 2
    out = tmp_path / "fit"
    code, text = _fit([str(fit_model), "-o", str(out), "--budget", str(budget), "--json", "--calib", str(calib), *COMMON])
    assert code == 0, text
    summary = json.loads(text)
    assert summary["peak_bytes"] <= summary["budget_bytes"] == budget
    assert len(set(summary["bits"].values())) > 1  # a budget between uniform peaks mixes widths
    assert 2 < summary["avg_bits"] < 8
    # the checkpoint holds exactly the bytes planned for its linears, and each module the chosen width
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    stored = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name, bits in summary["bits"].items():
            parts = [f.get_tensor(f"{name}.{p}") for p in ("qweight", "qzeros", "scales", "g_idx")]
            stored += sum(t.numel() * t.element_size() for t in parts)
            out_f = parts[2].shape[1]
            assert parts[0].shape[1] == out_f and parts[0].shape[0] * 32 // bits == parts[3].numel()
    assert stored == summary["linear_bytes"]
    assert str(config["bits"]) in summary["widths"]  # the default width is one of those chosen; the rest are overrides
    # quantool memory on the written checkpoint plans the same peak for the same job
    plan = CliRunner().invoke(main, ["memory", "--model", str(out), "--seq", "256", "--gen", "16", "--json"])
    assert json.loads(plan.output)["peak_bytes"] == summary["peak_bytes"] == summary["written_peak_bytes"]
    # and loads, with each module at its width, and generates
    model, tok = quantool.load(str(out), device="cpu")
    for name, bits in summary["bits"].items():
        assert model.get_submodule(name).bits == bits
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def test_fit_dry_run_and_too_small_budget(fit_model, tmp_path, story_text):
    calib = tmp_path / "c.txt"
    calib.write_text(story_text[:20000])
    cache = tmp_path / "sens.json"
    code, text = _fit([str(fit_model), "--dry-run", "--budget", "1GiB", "--sensitivities", str(cache), "--calib", str(calib), *COMMON])
    assert code == 0 and "planned peak" in text and "dry run" in text
    assert cache.exists() and not (tmp_path / "fit").exists()
    errors = json.loads(cache.read_text())["units"]
    for unit in errors.values():  # more bits, less loss
        e = unit["errors"]
        assert e["2"] > e["3"] > e["4"] > e["8"] >= 0
    code, text = _fit([str(fit_model), "--dry-run", "--budget", "1KiB", "--sensitivities", str(cache), "--calib", str(calib), *COMMON])
    assert code == 2 and "needs" in text and "1,024 bytes" in text and "Traceback" not in text
    code, text = _fit([str(fit_model), "--budget", "1GiB", *COMMON])
    assert code == 2 and "--dry-run" in text


def test_fit_kv_dtype_auto_can_choose_fp8(fit_model, tmp_path, story_text):
    """With a long job whose KV cache dominates, fp8 KV frees more than it costs; with room to spare, it stays bf16."""
    calib = tmp_path / "c.txt"
    calib.write_text(story_text[:20000])
    args = ["--dry-run", "--json", "--kv-dtype", "auto", "--bits", "4,8", "--calib", str(calib), *COMMON[:-4]]
    roomy = json.loads(_fit([str(fit_model), "--budget", "1GiB", "--seq", "256", *args])[1])
    assert roomy["kv_dtype"] == "bf16" and set(roomy["widths"]) == {"8"}
    big_kv = json.loads(_fit([str(fit_model), "--budget", "1GiB", "--seq", "256", "--batch", "64", *args])[1])
    tight = big_kv["peak_bytes"] - 1
    chosen = json.loads(_fit([str(fit_model), "--budget", str(tight), "--seq", "256", "--batch", "64", *args])[1])
    assert chosen["peak_bytes"] <= tight
    assert chosen["kv_dtype"] == "fp8" or set(chosen["widths"]) != {"8"}


def test_stored_bytes_match_the_packed_tensors():
    from quantool.quant.quantizer import QuantizedWeight, QuantSpec

    for bits, (out_f, in_f), group in [(2, (64, 96), 32), (3, (96, 128), 64), (4, (32, 64), -1), (8, (48, 32), 32)]:
        qw = QuantizedWeight.from_rtn(torch.randn(out_f, in_f), QuantSpec(bits=bits, group_size=group))
        assert gptq_layout.cannot_hold(bits, out_f, in_f) is None
        tensors = gptq_layout.pack(bits, "m", qw)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == gptq_layout.stored_bytes(bits, out_f, in_f, group)


def test_neighbours_narrows_each_linear_to_the_two_widths_around_the_budget():
    from quantool.fit import neighbours

    def opts(size: int, widths=(2, 3, 4, 8)) -> list:
        return [(b, Option(size * b, 1.0 / b)) for b in widths]

    options = {"a": opts(10), "b": opts(20), "c": opts(30, widths=(8,))}  # c holds only 8 bits
    uniform = {b: 10 * b + 20 * b + 240 for b in (2, 3, 4, 8)}
    kept = lambda room: {n: sorted(b for b, _ in o) for n, o in neighbours(options, (2, 3, 4, 8), room).items()}
    assert kept(uniform[3] + 5) == {"a": [3, 4], "b": [3, 4], "c": [8]}
    assert kept(uniform[4]) == {"a": [4, 8], "b": [4, 8], "c": [8]}
    assert kept(uniform[8] + 100) == {"a": [8], "b": [8], "c": [8]}
    assert kept(uniform[2] - 1) == {"a": [2, 3], "b": [2, 3], "c": [8]}  # nothing fits: the allocation will say so
