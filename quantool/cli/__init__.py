"""The quantool command line: parse, call the library, print. No algorithms live here; each command's options
come from the settings dataclass the library uses (`options.config_options`)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

# Read once, at torch's first allocation, so set before anything imports torch: buffers of 2 MiB and more get
# transparent huge pages (madvise), one page fault per 2 MiB instead of 512. The pipeline hands large buffers back to
# the system after each use (util.allocator), so every refine step faults its temporaries in afresh: 1.50 -> 1.17 s
# per step on SmolLM2 (EPYC, one core), same results. THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import click

from quantool import __version__
from quantool.cli.common import err
from quantool.errors import QuantoolError, os_error_line


class Group(click.Group):
    """Turns QuantoolError and OS errors into one red line and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QuantoolError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except OSError as exc:  # the disk, not the program: one line, and resumable state stays on disk
            err.print(f"[bold red]error:[/] {os_error_line(exc)}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/] (work so far is kept where the command supports --resume)")
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="quantool")
def main() -> None:
    """Will it fit, how do I shrink it, and what did shrinking cost?

    \b
    quantool memory --params 7B --method qlora        plan GPU memory (no download)
    quantool gptq ./model --bits 4 -o ./model-gptq    quantize (also awq, rtn, int8, nf4)
    quantool fit ./model --gpu 24GiB -o ./model-fit   bits per layer so the job fits the card
    quantool bench ./model ./model-gptq -o r.json     perplexity and speed vs fp16
    quantool report r.json -o reports/r.md            Markdown comparison with plots
    quantool run recipes/compare-all.yaml ./model     a whole pipeline from a recipe
    quantool qat ./model --data train.txt -o ./qat    quantization-aware fine-tuning
    """
    # quantool draws its own progress; bitsandbytes warns at import about an optional CPU kernel package
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _register() -> None:
    from quantool.cli import evaluate, fit, memory, qat, quantize

    for module in (memory, quantize, fit, evaluate, qat):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
