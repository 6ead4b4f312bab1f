"""What the commands share: the consoles and a step progress bar."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()
err = Console(stderr=True)


def step_progress(disable: bool) -> tuple[Progress, Callable[[str, int, int], None]]:
    """A progress display and its callback on_step(name, done, total)."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=err, disable=disable)
    tasks: dict = {}

    def on_step(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=total)
        progress.update(tasks[name], completed=done)

    return progress, on_step


def log_line(message: str) -> None:
    err.print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)
