"""Progress on stderr: a rich bar per scenario when rich is installed, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import Any

from ._model import Reporter

__all__ = ["PlainReporter", "make_reporter"]


def _short(text: str, limit: int = 300) -> str:
    """Notes stay readable: long errors are cut here (the JSON keeps them whole)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class PlainReporter:
    """One line per step on stderr."""

    def __init__(self) -> None:
        self._name = ""
        self._steps = 0
        self._done = 0

    def scenario(self, name: str, steps: int) -> None:
        """Start counting the steps of ``name``."""
        self._name, self._steps, self._done = name, steps, 0

    def step(self, text: str) -> None:
        """Print the step about to run."""
        self._done += 1
        print(f"[{self._name} {self._done}/{self._steps}] {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """Print a note."""
        print(f"note: {_short(text)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Nothing to stop."""


class _RichReporter:
    """A rich progress bar per scenario (on stderr, so stdout keeps only the results)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._console = Console(stderr=True)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[scenario]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self._console,
        )
        self._task: Any = None
        self._started = False
        self._fresh = True

    def _finish_task(self) -> None:
        if self._task is not None:
            total = self._progress.tasks[-1].total
            self._progress.update(self._task, completed=total, description="done")
            self._task = None

    def scenario(self, name: str, steps: int) -> None:
        """Add a bar for ``name``."""
        if not self._started:
            self._progress.start()
            self._started = True
        self._finish_task()
        self._task = self._progress.add_task("", total=steps, scenario=name)
        self._fresh = True

    def step(self, text: str) -> None:
        """Advance the bar and show the step about to run."""
        if self._task is None:
            return
        self._progress.update(self._task, advance=0 if self._fresh else 1, description=text)
        self._fresh = False

    def note(self, text: str) -> None:
        """Print a note above the bars."""
        from rich.text import Text

        self._console.print(Text.assemble(("note: ", "yellow"), _short(text)))

    def close(self) -> None:
        """Complete the last bar and stop the display."""
        self._finish_task()
        if self._started:
            self._progress.stop()
            self._started = False


def make_reporter() -> Reporter:
    """A rich reporter when rich is importable, else plain lines."""
    try:
        return _RichReporter()
    except ImportError:
        return PlainReporter()
