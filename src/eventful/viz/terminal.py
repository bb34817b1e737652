"""What a video run shows on the terminal: a progress bar and the summary table (rich), or
plain lines where the output is not an interactive terminal (CI, a pipe, a file)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta

from rich import box
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from eventful.video.report import summary, summary_table
from eventful.video.runner import FrameResult

PLAIN_EVERY = 50  # frames between two progress lines where the output is not a terminal


class RunProgress:
    """Progress of a video run on stderr: frames done of `total` (None: unknown), elapsed and
    remaining time, frames per second, mean share of tokens updated, ops saved so far and the
    latest frame's estimated cosine where the engine gives one.

    On an interactive terminal (rich's `Console.is_interactive`: a tty, not TERM=dumb; the
    TTY_INTERACTIVE, TTY_COMPATIBLE and FORCE_COLOR variables override it) a live progress
    bar; elsewhere a plain line every `every` frames and after the last.
    """

    def __init__(
        self, total: int | None, console: Console | None = None, every: int = PLAIN_EVERY
    ) -> None:
        self.total = total
        self.console = console or Console(stderr=True)
        self.every = every
        self.frames = 0
        self.macs = 0
        self.dense_macs = 0
        self.updated = 0.0
        self.estimated_cosine: float | None = None
        self.start = time.perf_counter()
        self.bar: Progress | None = None
        if self.console.is_interactive:
            self.bar, self.task = _live_bar(self.console, "frame", total)

    def update(self, frame: FrameResult) -> None:
        """Count one processed frame."""
        self.frames += 1
        self.macs += frame.macs
        self.dense_macs += frame.dense_macs
        self.updated += frame.updated_fraction
        self.estimated_cosine = frame.estimated_cosine
        if self.bar is not None:
            self.bar.update(self.task, completed=self.frames, stats=self.stats())
        elif self.frames % self.every == 0:
            self._print_line()

    def close(self) -> None:
        """Stop the bar, or print the line of the last frame where it is not printed yet."""
        if self.bar is not None:
            self.bar.stop()
        elif self.frames % self.every != 0:
            self._print_line()

    def stats(self) -> str:
        """fps, tokens updated, ops saved and the estimated cosine, as both displays show them."""
        elapsed = time.perf_counter() - self.start
        parts = [
            f"{self.frames / elapsed:.2f} fps",
            f"tokens updated {self.updated / self.frames:.1%}",
            f"ops saved {1 - self.macs / self.dense_macs:.1%}",
        ]
        if self.estimated_cosine is not None:
            parts.append(f"est. cos {self.estimated_cosine:.2f}")
        return " | ".join(parts)

    def _print_line(self) -> None:
        elapsed = time.perf_counter() - self.start
        if self.total is None:
            done = f"frame {self.frames}"
            times = f"elapsed {_clock(elapsed)}"
        else:
            left = max(self.total - self.frames, 0) * elapsed / self.frames
            done = f"frame {self.frames}/{self.total}"
            times = f"elapsed {_clock(elapsed)}, remaining {_clock(left)}"
        print(f"{done} | {times} | {self.stats()}", file=self.console.file, flush=True)


class StepProgress:
    """Progress of a training run on stderr: steps done of `total`, elapsed and remaining time,
    and `describe` of the latest step's log entry. A live bar on an interactive terminal (as
    `RunProgress`), else a plain line every `every` steps and after the last."""

    def __init__(
        self,
        total: int,
        describe: Callable[[dict], str],
        done: int = 0,
        console: Console | None = None,
        every: int = 10,
    ) -> None:
        self.total, self.done, self.started_at = total, done, done
        self.describe = describe
        self.console = console or Console(stderr=True)
        self.every = every
        self.entry: dict | None = None
        self.start = time.perf_counter()
        self.bar: Progress | None = None
        if self.console.is_interactive:
            self.bar, self.task = _live_bar(self.console, "step", total, done)

    def update(self, entry: dict) -> None:
        """Count one step, with its log entry."""
        self.done += 1
        self.entry = entry
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, stats=self.stats())
        elif self.done % self.every == 0:
            self._print_line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.entry is not None and self.done % self.every != 0:
            self._print_line()

    def stats(self) -> str:
        return self.describe(self.entry)

    def _print_line(self) -> None:
        elapsed = time.perf_counter() - self.start
        steps = max(self.done - self.started_at, 1)
        left = max(self.total - self.done, 0) * elapsed / steps
        times = f"elapsed {_clock(elapsed)}, remaining {_clock(left)}"
        line = f"step {self.done}/{self.total} | {times} | {self.stats()}"
        print(line, file=self.console.file, flush=True)


def _live_bar(
    console: Console, unit: str, total: int | None, done: int = 0
) -> tuple[Progress, TaskID]:
    """A started bar of `unit`s done of `total` (None: unknown), elapsed and remaining time,
    with a line of stats under it."""
    bar = _BarAndStats(
        TextColumn(unit),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("elapsed,"),
        TimeRemainingColumn(),
        TextColumn("remaining"),
        console=console,
    )
    task = bar.add_task(unit, total=total, completed=done, stats="")
    bar.start()
    return bar, task


class _BarAndStats(Progress):
    """The bar and times on one line, the stats under it: one line of both overflows a
    terminal of 80 columns."""

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            yield Text(task.fields["stats"])


def _clock(seconds: float) -> str:
    """Seconds as h:mm:ss, as rich's time columns write them."""
    return str(timedelta(seconds=round(seconds)))


def print_summary(report: dict, console: Console | None = None) -> None:
    """The summary table of a run report on stdout: a rich table on a terminal, else plain
    text (`summary_table`)."""
    console = console or Console()
    if not console.is_terminal:
        print(summary_table(report), file=console.file, flush=True)
        return
    content = summary(report)
    table = Table(box=box.SIMPLE_HEAD)
    for index, column in enumerate(content.columns):
        table.add_column(column, justify="right" if index in (1, 2) else "left")
    for row in content.rows:
        table.add_row(*row)
    console.print(Text(content.title, style="bold"), soft_wrap=True)
    console.print(table)
    for note in content.notes:
        console.print(Text(note), soft_wrap=True)
