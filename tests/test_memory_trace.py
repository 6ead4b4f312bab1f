"""The planner's whole-job peak against the same workloads traced tensor by tensor on the CPU.

`trace.LiveTensorBytes` counts every tensor an ATen op returns until it is freed: forward, backward and
optimizer step, so this checks the phases (logits, backward temporaries, optimizer step) that the
saved-tensor inventory tests in test_memory.py cannot. The workloads run the attention kernel CUDA would
pick (fp32 with grouped heads: the math path), and the prediction compared is `traced_peak_bytes`, the
plan without its CUDA-only terms (cuBLAS workspaces, kernel-internal buffers). Cases are excluded only
where bitsandbytes runs another code path on CPU than on CUDA (int8 layers, NF4 inference's packed CPU kernel).
"""

import statistics

import pytest
import torch

from quantool.memory import Job, estimate
from quantool.memory.measure import measure
from quantool.memory.shapes import ModelShape
from quantool.memory.trace import LiveTensorBytes

SHAPES = {  # each makes a different phase the peak
    "logits": ModelShape("logits-heavy", 4000, 128, 344, 2, 4, 2),
    "mlp": ModelShape("mlp-heavy", 256, 256, 688, 2, 4, 4),
    "attn": ModelShape("attention-heavy", 256, 128, 128, 2, 8, 8, head_dim=32),
    "tied": ModelShape("tied-gqa", 2000, 192, 512, 2, 6, 2, tied=True),
    "tied-vocab": ModelShape("tied-large-vocab", 16000, 64, 172, 2, 4, 2, tied=True),  # embedding gradient last
}
_B = dict(batch=2, seq=64)
JOBS = {
    "full": Job(method="full", **_B),
    "fp32": Job(method="full", weights_dtype="fp32", **_B),
    "autocast": Job(method="full", weights_dtype="fp32", autocast=True, **_B),
    "ckpt": Job(method="full", grad_checkpointing=True, **_B),
    "adamw8bit": Job(method="full", optimizer="adamw8bit", **_B),
    "sgd": Job(method="full", optimizer="sgd", **_B),
    "lora": Job(method="lora", lora_rank=8, **_B),
    "lora-qv": Job(method="lora", lora_rank=8, lora_targets=("qv",), **_B),
    "lora-ckpt": Job(method="lora", lora_rank=8, grad_checkpointing=True, **_B),
    "qlora": Job(method="qlora", lora_rank=8, **_B),
    "qlora-nockpt": Job(method="qlora", lora_rank=8, grad_checkpointing=False, **_B),
    "keep-outputs": Job(method="full", keep_outputs=True, **_B),
    "qlora-keep-outputs": Job(method="qlora", lora_rank=8, keep_outputs=True, **_B),
    "fp32-long": Job(method="full", weights_dtype="fp32", batch=1, seq=512, grad_checkpointing=True, keep_outputs=True),
    "inference": Job(method="inference", gen=8, **_B),
    "inference-long": Job(method="inference", batch=1, seq=16, gen=200),
}


def test_tracer_counts_live_storages_once():
    kept = torch.empty(100)  # 400 bytes, alive before tracing
    with LiveTensorBytes("cpu", existing=[kept]) as traced:
        a = torch.empty(1000)  # 4000
        view = a.view(10, 100)  # same storage: not counted again
        b = torch.ones(500)  # 2000
        del a, view
        c = b * 2  # 2000
    assert traced.start_bytes == 400
    assert traced.peak_bytes == 400 + 4000 + 2000
    assert traced.live_bytes == 400 + 2000 + 2000
    assert {"op": "ones.default", "shape": [500], "dtype": "float32", "bytes": 2000} in traced.largest_at_peak()
    del b, c


def test_tracer_follows_backward():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    with LiveTensorBytes("cpu", existing=[x, w]) as traced:
        (x @ w).square().sum().backward()
    assert traced.live_bytes == traced.start_bytes + x.numel() * 4 + w.numel() * 4  # the two .grad tensors
    assert traced.peak_bytes > traced.live_bytes  # the matmul output and its gradient came and went


@pytest.fixture(scope="module")
def trace_errors() -> dict[tuple[str, str], float]:
    """Prediction error against the traced peak for every shape x job (about a minute on 2 cores)."""
    pytest.importorskip("bitsandbytes")
    return {(s, j): estimate(SHAPES[s], JOBS[j]).traced_peak_bytes / measure(SHAPES[s], JOBS[j], "cpu")["peak_bytes"] - 1
            for s in SHAPES for j in JOBS}


@pytest.mark.parametrize("job_name", list(JOBS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_prediction_matches_cpu_trace(trace_errors, shape_name, job_name):
    error = trace_errors[shape_name, job_name]
    assert abs(error) <= 0.05, f"predicted {error:+.2%} off the traced peak"


def test_trace_errors_median(trace_errors):
    assert statistics.median(abs(e) for e in trace_errors.values()) <= 0.01


def test_measurement_suite_writes_what_the_accuracy_test_reads(tmp_path):
    """The suite runner end to end on the CPU: the file a GPU session commits, resumable, and its table."""
    import json

    from memory_suite import run_suite, table

    from quantool.memory import Job, ModelShape

    cases = [{"model": "smollm2-135m", "job": {"method": "inference", "batch": 1, "seq": 32, "gen": 4}},
             {"model": "smollm2-135m", "job": {"method": "lora", "batch": 1, "seq": 32, "lora_rank": 4, "lora_targets": ["qv"]}}]
    out = tmp_path / "measured.json"
    run_suite(cases, "cpu", out, log=lambda m: None)
    logged = []
    run_suite(cases, "cpu", out, resume=True, log=logged.append)
    assert logged == []  # nothing re-run
    data = json.loads(out.read_text())
    assert len(data["cases"]) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["measured.json"]
    measured_cases = ((ModelShape.from_dict(c["shape"]), Job.from_dict(c["job"]), c["measured"]["peak_bytes"]) for c in data["cases"])
    for (shape, job, measured), case in zip(measured_cases, data["cases"]):
        assert abs(estimate(shape, job).traced_peak_bytes / measured - 1) <= 0.05
        assert case["label"].startswith(job.method)
    assert "| smollm2-135m | lora b1 s32 lora qv |" in table(data)


def test_cli_measure_cpu():
    import json

    from click.testing import CliRunner

    from quantool.cli import main

    args = ["memory", "--model", "smollm2-135m", "--seq", "16", "--gen", "2", "--weights-dtype", "fp32"]
    result = CliRunner().invoke(main, [*args, "--measure", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert abs(data["traced_peak_bytes"] / data["measured"]["peak_bytes"] - 1) <= 0.05
    assert data["measured"]["largest_at_peak"][0]["bytes"] > 0
    table = CliRunner().invoke(main, [*args, "--measure", "cpu"])
    assert table.exit_code == 0 and "live at the peak" in table.output and "traced op by op" in table.output
