"""The memory planner: shapes, the activation inventory against real autograd, CLI contract."""

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from quantool.cli import main
from quantool.memory import Job, estimate, from_hf_config, from_param_count, resolve_model, solve
from quantool.memory.activations import activation_bytes, layer_saved_bytes_per_token, rope_bytes
from quantool.memory.shapes import ModelShape

MEASURED = Path(__file__).parent / "data" / "memory_measurements.json"

# Parameter counts published on each model card / computed by transformers from the real configs.
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "tinyllama-1.1b": 1_100_048_384,
    "gpt2": 124_439_808,
    "opt-125m": 125_239_296,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_catalog_param_counts_match_published(name):
    assert resolve_model(name).param_count() == PUBLISHED[name]


def test_param_count_matches_transformers_for_built_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    assert from_hf_config(cfg.to_dict()).param_count() == sum(p.numel() for p in model.parameters())


def test_params_resolves_to_llama_shapes():
    assert from_param_count(7_000_000_000).name == "llama-2-7b"
    shape = from_param_count(500_000_000)
    assert abs(shape.param_count() / 5e8 - 1) < 0.15
    assert "Llama-shaped" in shape.note


def _saved_bytes(model, ids):
    """Unique storages autograd saves during a forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(seen.values())


def _lora(targets):
    def wrap(model):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=8, target_modules=targets, lora_dropout=0.0))
    return wrap


_B = dict(batch=2, seq=64)
CASES = [
    ("full bf16", torch.bfloat16, Job(method="full", **_B), None),
    ("full fp32 (math attention)", torch.float32, Job(method="full", weights_dtype="fp32", **_B), None),
    ("lora all", torch.bfloat16, Job(method="lora", lora_rank=8, **_B), _lora("all-linear")),
    ("lora qv", torch.bfloat16, Job(method="lora", lora_rank=8, lora_targets=("qv",), **_B), _lora(["q_proj", "v_proj"])),
    ("lora qv fp32 (math attention)", torch.float32, Job(method="lora", lora_rank=8, lora_targets=("qv",), weights_dtype="fp32", **_B),
     _lora(["q_proj", "v_proj"])),
    ("full fp32 MHA (efficient attention)", torch.float32, Job(method="full", weights_dtype="fp32", **_B), "mha"),
]


@pytest.mark.parametrize("name,dtype,job,wrap", CASES, ids=[c[0] for c in CASES])
def test_activation_inventory_matches_autograd(name, dtype, job, wrap):
    """Per-layer saved bytes predicted == bytes autograd really keeps (difference of a 2- and 1-layer model), with
    the attention kernel CUDA would pick (fp32 with grouped heads: the math path, which saves [B, H, S, S])."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from quantool.memory.measure import cuda_attention

    kv_heads = 4 if wrap == "mha" else 2
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=kv_heads,
              head_dim=16, tie_word_embeddings=False)
    shape = ModelShape("t", 128, 64, 176, 1, 4, kv_heads, 16)
    measured = []
    for layers in (1, 2):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=layers, **kw), dtype=dtype, attn_implementation="sdpa")
        model = wrap(model) if callable(wrap) else model
        model.train()
        with cuda_attention(shape, job):
            measured.append(_saved_bytes(model, torch.randint(0, 128, (job.batch, job.seq))))
    per_token = (measured[1] - measured[0]) / (job.batch * job.seq)
    assert layer_saved_bytes_per_token(shape, job) == per_token


def _qlora_model(path, layers, kw):
    """A real bitsandbytes NF4 model prepared as the QLoRA recipe does (bnb runs on CPU)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=layers, **kw), dtype=torch.bfloat16).save_pretrained(path)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))


WHOLE = [
    ("full bf16", torch.bfloat16, Job(method="full", batch=2, seq=64), None),
    ("full fp32", torch.float32, Job(method="full", weights_dtype="fp32", batch=2, seq=64), None),
    ("lora all", torch.bfloat16, Job(method="lora", lora_rank=8, batch=2, seq=64), _lora("all-linear")),
    ("full bf16 checkpointing", torch.bfloat16, Job(method="full", grad_checkpointing=True, batch=2, seq=64), "ckpt"),
    ("qlora", None, Job(method="qlora", lora_rank=8, grad_checkpointing=False, batch=2, seq=64), "qlora"),
]


@pytest.mark.parametrize("name,dtype,job,wrap", WHOLE, ids=[c[0] for c in WHOLE])
def test_whole_model_saved_bytes_match_autograd(name, dtype, job, wrap, tmp_path):
    """All tensors saved by a training forward with labels == activations + the fp32 log-probs of the loss."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from quantool.memory.measure import cuda_attention

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, tie_word_embeddings=False)
    if wrap == "qlora":
        pytest.importorskip("bitsandbytes")
        model = _qlora_model(tmp_path / "m", 2, kw)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=2, **kw), dtype=dtype, attn_implementation="sdpa")
        if wrap == "ckpt":
            model.gradient_checkpointing_enable()
        elif wrap:
            model = wrap(model)
    model.train()
    ids = torch.randint(0, 128, (job.batch, job.seq))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    shape = ModelShape("t", 128, 64, 176, 2, 4, 2, 16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cuda_attention(shape, job):
        model(input_ids=ids, labels=ids)
    predicted = activation_bytes(shape, job) + 4 * job.batch * job.seq * shape.vocab + 4  # + fp32 log-probs, loss weight
    if job.checkpointing:  # checkpointed layers hold RoPE's cos/sin on their context, out of reach of the hooks
        predicted -= rope_bytes(shape, job)
    assert sum(seen.values()) == predicted


def test_checkpointing_and_lora_shrink_the_peak():
    shape = resolve_model("llama-3-8b")
    full = estimate(shape, Job(method="full", seq=4096))
    ckpt = estimate(shape, Job(method="full", seq=4096, grad_checkpointing=True))
    assert ckpt.phases["forward (loss)"] < full.phases["forward (loss)"]
    lora = estimate(shape, Job(method="lora", seq=4096))
    qlora = estimate(shape, Job(method="qlora", seq=4096))
    assert qlora.peak_bytes < lora.peak_bytes < full.peak_bytes


def test_lora_trainable_params_formula():
    shape = ModelShape("t", 1000, 64, 128, 3, 4, 2)
    plan = estimate(shape, Job(method="lora", lora_rank=4, lora_targets=("qv",)))
    assert plan.trainable_params == 3 * 4 * ((64 + 64) + (64 + 32))


def test_kv_cache_is_gqa_aware():
    mha = ModelShape("mha", 32000, 4096, 11008, 32, 32, 32)
    gqa = replace(mha, name="gqa", kv_heads=8)
    job = Job(method="inference", batch=4, seq=4096, gen=0)
    assert estimate(mha, job).components["kv_cache"] == 4 * estimate(gqa, job).components["kv_cache"]
    assert estimate(mha, job).components["kv_cache"] == 2 * 32 * 4 * 4096 * 4096 * 2


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_weight_bytes_match_bitsandbytes(quant, tmp_path):
    """Storage of real bitsandbytes layers (data, absmax, nested state, code tables, row scales) == the formula."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    qc = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16) if quant == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qc, device_map={"": "cpu"})
    nbytes = lambda t: t.numel() * t.element_size()
    measured = 0
    for mod in model.modules():
        if isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            measured += nbytes(mod.weight)
            if quant == "nf4":
                qs = mod.weight.quant_state
                measured += nbytes(qs.absmax) + nbytes(qs.code) + nbytes(qs.state2.absmax) + nbytes(qs.state2.code)
            else:
                measured += nbytes(mod.weight.SCB)
    plan = estimate(from_hf_config(cfg.to_dict()), Job(method="inference", quant=quant, seq=1, gen=1))
    assert plan.components["weights.linear"] == measured
    assert plan.labels["weights.linear"] == f"weights (linear layers, {quant} + quant metadata)"


def test_zero_stages_shrink_per_gpu_memory():
    shape = resolve_model("llama-2-13b")
    peaks = [estimate(shape, Job(method="full", gpus=8, zero=z)).peak_bytes for z in (1, 2, 3)]
    assert peaks[0] > peaks[1] > peaks[2]


def test_solve_finds_the_boundary():
    shape = resolve_model("qwen2.5-0.5b")
    budget = 24 * 2**30
    batch, plan = solve(shape, Job(method="full", seq=1024), budget, "batch")
    assert batch >= 1 and plan.device_bytes <= budget
    assert estimate(shape, Job(method="full", seq=1024, batch=batch + 1)).device_bytes > budget


def test_cli_json_interface():
    result = CliRunner().invoke(main, ["memory", "--params", "7B", "--method", "qlora", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["peak_bytes"] == sum(data["components"].values())
    assert data["params"] == PUBLISHED["llama-2-7b"]
    assert 0 < data["trainable_params"] < data["params"] / 100


@pytest.mark.parametrize("gpu,fits", [("h100-80gb", True), ("rtx4090", False)])
def test_cli_table_and_verdict(gpu, fits):
    """The verdict line says what the JSON says, and the full fine-tuning comparison is the library's number."""
    args = ["memory", "--model", "llama-3-8b", "--method", "lora", "--gpu", gpu]
    data = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert data["gpu"]["fits"] is fits
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    verdict = result.output.strip().splitlines()[-1]
    assert verdict.startswith("fits on" if fits else "does not fit on"), verdict
    full = estimate(resolve_model("llama-3-8b"), Job(method="full", grad_checkpointing=False,
                                                     compute_capability=data["job"]["compute_capability"])).peak_bytes
    assert data["full_finetune_bytes"] == full and "vs full fine-tuning" in result.output


@pytest.mark.parametrize("args,needle", [
    (["--model", "lama-3-8b"], "did you mean llama-3-8b"),
    (["--params", "0"], "positive"),
    (["--params", "7B", "--batch", "0"], "--batch must be a positive"),
    (["--params", "7B", "--method", "qlora", "--quant", "int8"], "cannot use --quant int8"),
    (["--params", "7B", "--lora-rank", "8"], "need --method lora"),
    (["--params", "7B", "--gpu", "h1000"], "unknown GPU"),
    (["--params", "7B", "--solve", "batch"], "--solve needs --gpu"),
    (["--model", "/nonexistent/config.json"], "does not exist"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    result = CliRunner().invoke(main, ["memory", *args])
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output


def test_malformed_config(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(main, ["memory", "--model", str(bad)])
    assert result.exit_code == 2 and "not valid JSON" in result.output
    bad.write_text('{"model_type": "llama"}')
    result = CliRunner().invoke(main, ["memory", "--model", str(bad)])
    assert result.exit_code == 2 and "missing hidden_size" in result.output


@pytest.mark.skipif(not MEASURED.exists(), reason="the 25-job suite has not been measured on a GPU yet (tools/measure_memory.py)")
def test_prediction_error_against_measured_peaks():
    from memory_suite import predicted_bytes

    data = json.loads(MEASURED.read_text())
    errors = [abs(predicted_bytes(case) / case["measured"]["peak_bytes"] - 1) for case in data["cases"]]
    assert len(errors) >= 20
    assert max(errors) <= 0.05
    assert sorted(errors)[len(errors) // 2] <= 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_harness_runs_on_gpu():
    from quantool.memory.measure import measure

    shape = resolve_model("smollm2-135m")
    job = Job(method="full", batch=2, seq=512)
    measured = measure(shape, job)
    assert abs(estimate(shape, job).peak_bytes / measured["peak_bytes"] - 1) < 0.1


def test_quantization_job_plan():
    shape = resolve_model("llama-2-70b")
    gptq = estimate(shape, Job(method="quantize", ptq="gptq", seq=512))
    # one layer at a time: far below the model's own 138 GB of fp16 weights
    assert gptq.peak_bytes < 24 * 2**30 < shape.param_count() * 2
    # GPTQ's largest stage is down_proj's: its [in, in] fp32 Hessian, and two more while it is factorized
    assert gptq.components["gptq.hessian"] == 4 * 28672**2 and gptq.components["gptq.work"] >= 2 * 4 * 28672**2
    # AWQ keeps every linear's inputs, bounded by --awq-search-tokens: more samples stop costing memory
    awq = {n: estimate(shape, Job(method="quantize", ptq="awq", seq=512, nsamples=n)).peak_bytes for n in (4, 16, 128)}
    assert awq[4] < awq[16] == awq[128]
    deeper = replace(shape, layers=shape.layers * 4)
    assert estimate(deeper, Job(method="quantize", ptq="gptq", seq=512)).peak_bytes == gptq.peak_bytes
    result = CliRunner().invoke(main, ["memory", "--params", "70B", "--method", "quantize", "--seq", "512", "--gpu", "24GiB", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["gpu"]["fits"]
    cpu = json.loads(CliRunner().invoke(main, ["memory", "--params", "70B", "--method", "quantize", "--ptq-device", "cpu",
                                               "--json"]).output)
    assert cpu["peak_bytes"] == 0 and cpu["host_bytes"] > gptq.host_bytes  # all of it in host RAM


def test_quantization_plan_matches_measured_host_peaks():
    """The host peaks of reports/streaming-memory.json (Llama-2-7B shapes, quantool rtn/gptq/awq on a CPU) against
    the planner: within 10%, at every depth measured."""
    data = json.loads((Path(__file__).parent.parent / "reports/streaming-memory.json").read_text())
    shape = resolve_model("llama-2-7b")
    assert data["runs"]
    for run in data["runs"]:
        nsamples = int(run["command"].split("--nsamples ")[1]) if "--nsamples" in run["command"] else 128
        plan = estimate(replace(shape, layers=run["layers"]), Job(method="quantize", ptq=run["method"], seq=512, nsamples=nsamples,
                                                                  ptq_device="cpu", calib_bytes=run["calib_bytes"]))
        error = plan.host_bytes / run["peak_rss_bytes"] - 1
        assert abs(error) < 0.10, f"{run['method']} {run['layers']} layers: predicted {error:+.1%} off the measured peak RSS"


def test_moe_quantization_plan_matches_measured_host_peaks():
    """reports/streaming-memory-qwen3-30b-a3b.json (Qwen3-30B-A3B layer shapes, 128 experts, GPTQ on every expert, on a
    CPU) against the planner, with the tokenizer term at the size of the tokenizer those random models carry: within
    10%, and flat in depth."""
    from quantool.memory.quantize import TOKENIZER_BYTES_PER_TOKEN
    from quantool.memory.shapes import from_config

    data = json.loads((Path(__file__).parent.parent / "reports/streaming-memory-qwen3-30b-a3b.json").read_text())
    assert len({r["layers"] for r in data["runs"]}) > 1
    for run in data["runs"]:
        shape = from_config({**data["config"], "num_hidden_layers": run["layers"]}, data["shape"])
        nsamples = int(run["command"].split("--nsamples ")[1].split()[0])
        host = estimate(shape, Job(method="quantize", ptq=run["method"], seq=512, nsamples=nsamples, ptq_device="cpu",
                                   calib_bytes=run["calib_bytes"])).host
        host["the tokenizer (measured per vocabulary entry)"] = TOKENIZER_BYTES_PER_TOKEN * run["tokenizer_vocab"]
        error = sum(host.values()) / run["peak_rss_bytes"] - 1
        assert abs(error) < 0.10, f"{run['method']} {run['layers']} layers: predicted {error:+.1%} off the measured peak RSS"
    peaks = [r["peak_rss_bytes"] for r in data["runs"]]
    assert max(peaks) / min(peaks) < 1.02


def test_quantization_plan_matches_measured_host_peaks_on_a_real_model():
    """reports/quantize-memory.json (SmolLM2-135M, rtn and gptq/awq at two calibration sizes, and --refine runs, on a
    CPU) against the planner: within 10% for every run."""
    data = json.loads((Path(__file__).parent.parent / "reports/quantize-memory.json").read_text())
    assert {r["method"] for r in data["runs"]} == {"rtn", "gptq", "awq"}
    assert len({(r["method"], r["refine_batch"]) for r in data["runs"] if "refine_batch" in r}) >= 2  # --refine runs
    for run in data["runs"]:
        job = Job(method="quantize", ptq=run["method"], seq=run["seqlen"] or 512, nsamples=run["nsamples"] or 128, ptq_device="cpu",
                  calib_bytes=run["calib_bytes"], refine=2 if "refine_batch" in run else 0, refine_batch=run.get("refine_batch", 8))
        error = estimate(resolve_model(run["model"]), job).host_bytes / run["peak_rss_bytes"] - 1
        assert abs(error) < 0.10, f"{run['method']} {run['nsamples']} x {run['seqlen']}: predicted {error:+.1%} off the measured peak RSS"


@pytest.mark.parametrize("job", [
    Job(method="inference", batch=2, seq=32, gen=4),
    Job(method="inference", batch=1, seq=16, gen=2, quant="nf4"),
    Job(method="full", batch=2, seq=32),
    Job(method="full", batch=2, seq=32, weights_dtype="fp32", autocast=True, optimizer="adamw8bit"),
    Job(method="lora", batch=2, seq=32, lora_rank=4, quant="int8"),
    Job(method="qlora", batch=2, seq=32, lora_rank=4),
], ids=["inference", "inference-nf4", "full", "autocast-adamw8bit", "lora-int8", "qlora"])
def test_measure_workloads_build_and_run_on_cpu(job):
    """The --measure recipes (bnb swap, kbit preparation, PEFT, optimizers) run; the GPU adds only the peak reading."""
    pytest.importorskip("bitsandbytes")
    from quantool.memory.measure import build_workload

    shape = ModelShape("t", 128, 64, 128, 2, 4, 2)
    model, run = build_workload(shape, job, "cpu")
    losses = run()
    if job.training:
        assert len(losses) == 2 and all(x == x for x in losses)  # finite, not NaN
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == estimate(shape, job).trainable_params


def test_cli_version_and_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.strip() == f"quantool, version {__import__('quantool').__version__}"
    help_text = runner.invoke(main, ["--help"]).output
    for command in ("memory", "quantize", "gptq", "awq", "rtn", "int8", "nf4", "bench", "report", "run", "qat", "fit"):
        assert f"  {command} " in help_text
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # click warns of an option generated twice (two settings classes sharing a name)
            assert "Example" in runner.invoke(main, [command, "--help"], catch_exceptions=False).output


def test_live_at_peak_replays_the_allocator_trace():
    """The --measure breakdown on CUDA: replay alloc/free events to the peak, group live blocks by allocating code."""
    from quantool.memory.measure import live_at_peak

    site = "/x/site-packages/"
    frames = lambda f, fn: [{"filename": site + "torch/nn/modules/module.py", "name": "_call_impl"},
                            {"filename": site + f, "name": fn, "line": 1}]
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames("transformers/models/llama/modeling_llama.py", "forward")},
        {"action": "alloc", "addr": 2, "size": 300, "frames": frames("transformers/loss/loss_utils.py", "ForCausalLMLoss")},
        {"action": "alloc", "addr": 3, "size": 50, "frames": []},
        {"action": "free_requested", "addr": 2},
        {"action": "free_completed", "addr": 2},
        {"action": "alloc", "addr": 4, "size": 200, "frames": []},
    ]
    groups = live_at_peak({"device_traces": [events]})
    assert groups[0] == {"origin": "transformers/loss/loss_utils.py:ForCausalLMLoss", "bytes": 300}
    assert {g["origin"] for g in groups[1:]} == {"transformers/models/llama/modeling_llama.py:forward",
                                                   "no Python frame (autograd engine or C++: backward, optimizer kernels, cuBLAS workspace)"}
    assert sum(g["bytes"] for g in groups) == 450  # the peak: blocks 1, 2 and 3


def test_gpu_generation_sets_cuda_only_terms():
    shape = resolve_model("llama-3-8b")
    job = Job(method="lora", batch=2, seq=1024)
    hopper, ampere = estimate(shape, job), estimate(shape, replace(job, compute_capability="8.0"))
    assert hopper.components["cublas"] == 2 * 32 * 2**20 and hopper.labels["cublas"] == "2 cuBLAS workspaces (CUDA only)"
    assert ampere.components["cublas"] == 2 * (8 * 2**20 + 128 * 2**10)
    assert "cudnn attention" in hopper.notes[0] and "flash attention" in ampere.notes[0]
    assert hopper.traced_peak_bytes == ampere.traced_peak_bytes  # a CPU trace sees neither
    result = CliRunner().invoke(main, ["memory", "--model", "llama-3-8b", "--method", "lora", "--gpu", "a100", "--json"])
    assert json.loads(result.output)["job"]["compute_capability"] == "8.0"


def test_math_attention_in_fp32_qlora():
    """QLoRA's fp32 q/k/v with grouped heads run the math kernel: [B, H, S, S] per layer, and more with kept outputs."""
    shape = resolve_model("llama-3-8b")
    qlora = estimate(shape, Job(method="qlora", seq=4096))
    assert "math attention" in qlora.notes[0]
    assert qlora.components["attention.cuda"] == 32 * 4096 * 4096 * 4  # CUDA softmax backward's grad * output
    kept = estimate(shape, Job(method="qlora", seq=4096, keep_outputs=True))
    assert kept.peak_bytes - qlora.peak_bytes == 4096 * shape.vocab * 4  # the fp32 logits the loop keeps


def test_keep_outputs_needs_a_training_loop():
    result = CliRunner().invoke(main, ["memory", "--params", "7B", "--keep-outputs"])
    assert result.exit_code == 2 and "--keep-outputs describes a training loop" in result.output
    result = CliRunner().invoke(main, ["memory", "--params", "7B", "--method", "full", "--keep-outputs"])
    assert result.exit_code == 0 and "--keep-outputs" in result.output


CONFIG_ENTRIES = [e for e in json.loads((Path(__file__).parents[1] / "quantool/memory/data/architectures.json").read_text())["models"]
                  if "config" in e]


@pytest.mark.parametrize("entry", CONFIG_ENTRIES, ids=[e["name"] for e in CONFIG_ENTRIES])
def test_catalog_families_count_their_published_parameters(entry):
    """Current families (Llama 3.1/3.3, Qwen3 dense and MoE, DeepSeek-V3, gpt-oss, Phi-4, Mistral Small 3, OLMo 2,
    Gemma 3), counted on transformers' module graph from their config: the model card's count (DeepSeek-V3's card
    also counts its routers' correction biases, buffers in transformers: within 0.001%)."""
    shape = resolve_model(entry["name"])
    assert abs(shape.param_count() / entry["published_params"] - 1) < 1e-5, shape.param_count()
    assert shape.hf_id == entry["hf_id"]
    assert resolve_model(entry["hf_id"]).param_count() == shape.param_count()  # the hub id resolves to the catalog offline


def test_moe_mla_sliding_and_mqa_shapes():
    """What the KV cache and activations read: DeepSeek-V3's dense first layers, MLA's per-head cache in transformers,
    gpt-oss's sliding-window layers, Falcon's multi-query attention."""
    deepseek = resolve_model("deepseek-v3")
    assert (deepseek.moe_layers, deepseek.experts, deepseek.expert_intermediate, deepseek.shared_intermediate) == (58, 256, 2048, 2048)
    assert (deepseek.kv_heads, deepseek.k_head_dim, deepseek.v_head_dim) == (128, 192, 128)
    oss = resolve_model("gpt-oss-20b")
    assert (oss.sliding_layers, oss.sliding_window, oss.experts_per_token) == (12, 128, 4)
    job = Job(method="inference", seq=8192, gen=0)
    from quantool.memory.storage import kv_bytes

    assert kv_bytes(oss, job, 8192) == (12 * 8192 + 12 * 128) * 8 * 128 * 2
    from quantool.memory.shapes import from_config

    falcon = from_config({"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "vocab_size": 512, "multi_query": True, "new_decoder_architecture": False}, "f")
    assert falcon.kv_heads == 1 and falcon.mlp == "plain" and falcon.norm == "layer"
