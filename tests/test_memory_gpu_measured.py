"""`quantool memory` against peaks measured on an H100 (tests/data/memory_h100.json): no GPU needed here.

Each job runs through the command line exactly as a user would type it for that recipe: the loop keeps its
output (`--keep-outputs`) and checkpointing is explicit.
"""

import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantool.cli import main

DATA = json.loads((Path(__file__).parent / "data" / "memory_h100.json").read_text())


def cli_args(job: dict, config: Path) -> list[str]:
    args = ["memory", "--model", str(config), "--method", job["mode"], "--batch", str(job["batch"]), "--seq", str(job["seq"]),
            "--keep-outputs", "--grad-checkpointing" if job.get("ckpt") else "--no-grad-checkpointing", "--json"]
    if "weights" in job:
        args += ["--weights-dtype", job["weights"]]
    if job.get("autocast"):
        args.append("--autocast")
    if "optim" in job:
        args += ["--optimizer", job["optim"]]
    if job["mode"] in ("lora", "qlora"):
        args += ["--lora-rank", str(job["r"]), "--lora-targets", job.get("targets", "all")]
    if "quant" in job:
        args += ["--quant", job["quant"]]
    return args


@pytest.fixture(scope="module")
def errors(tmp_path_factory) -> dict[str, float]:
    out = {}
    for case in DATA["cases"]:
        config = tmp_path_factory.mktemp(case["id"]) / "config.json"
        config.write_text(json.dumps({"model_type": "llama", **case["architecture"]}))
        result = CliRunner().invoke(main, cli_args(case["job"], config))
        assert result.exit_code == 0, result.output
        predicted = json.loads(result.output)
        assert predicted["params"] == case["measured"]["params_total"] or case["job"]["mode"] == "qlora"
        assert predicted["trainable_params"] == case["measured"]["params_trainable"]
        out[case["id"]] = predicted["peak_bytes"] / case["measured"]["peak_alloc"] - 1
    return out


@pytest.mark.parametrize("case_id", [c["id"] for c in DATA["cases"]])
def test_each_job_within_5_percent(errors, case_id):
    assert abs(errors[case_id]) <= 0.05, f"{case_id}: predicted {errors[case_id]:+.2%} off the H100 peak"


def test_median_within_2_percent(errors):
    assert statistics.median(abs(e) for e in errors.values()) <= 0.02
