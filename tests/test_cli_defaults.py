"""One source of defaults: every command's options are generated from the settings dataclass the library uses, so
the command line with no options runs exactly the library's default job."""

import dataclasses
import json
from enum import Enum

import pytest
from click.testing import CliRunner

from quantool.cli import main
from quantool.cli.evaluate import bench
from quantool.cli.memory import memory
from quantool.cli.qat import qat
from quantool.cli.quantize import quantize
from quantool.eval.bench import BenchConfig
from quantool.memory import Job, estimate, from_param_count
from quantool.memory.job import Method
from quantool.ptq.config import PTQConfig
from quantool.qat import QATConfig


@pytest.mark.parametrize("method", [m.value for m in Method])
def test_memory_cli_plans_the_library_job(method):
    result = CliRunner().invoke(main, ["memory", "--params", "7B", "--method", method, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    job = Job(method=method)
    assert data["job"] == json.loads(json.dumps(dataclasses.asdict(job)))
    assert data["peak_bytes"] == estimate(from_param_count(7_000_000_000), job).peak_bytes
    assert data["trainable_params"] == estimate(from_param_count(7_000_000_000), job).trainable_params


def test_qat_plan_is_full_qat_by_default_in_both():
    """The two used to disagree: the command planned full QAT, the library LoRA-QAT r16."""
    assert not Job(method="qat").uses_lora and Job(method="qat", lora_rank=16).uses_lora


@pytest.mark.parametrize("command,cls,args", [(memory, Job, []), (quantize, PTQConfig, ["m", "-o", "o"]),
                                              (bench, BenchConfig, ["m", "-o", "o"]), (qat, QATConfig, ["m", "-o", "o", "--data", "d"])],
                         ids=["memory", "quantize", "bench", "qat"])
def test_generated_options_default_to_the_dataclass(command, cls, args):
    ctx = command.make_context(command.name, list(args))
    defaults = cls()
    checked = 0
    for field in dataclasses.fields(cls):
        if field.metadata.get("cli") is False:
            continue
        value, default = ctx.params[field.name], getattr(defaults, field.name)
        assert value == (default.value if isinstance(default, Enum) else default), field.name
        checked += 1
    assert checked >= 10
