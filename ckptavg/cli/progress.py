"""What a command shows as it works: progress bars, a line per output, failed scores, a follower's report;
each an `Events` listener (`trajectory/events.py`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import typer

from ..errors import CkptavgWarning
from ..trajectory.events import Events
from .console import err, say


class Bars(Events):
    """What a command shows as it works: one rich progress display, a bar of bytes for every download and
    every average, a line per output written (unless quiet), one line per failed score, and a progress line
    over the scores once `count_scores` is called."""

    def __init__(self, quiet: bool) -> None:
        self.progress, self.quiet, self.score_line = None, quiet, None
        if not quiet:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True)

    def __enter__(self) -> Bars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, description: str, total: int) -> Callable[[int], None]:
        bars = self.progress
        if bars is None:
            return lambda n: None
        for task in list(bars.tasks):
            if task.finished:
                bars.remove_task(task.id)
        task_id = bars.add_task(description, total=total)
        return lambda n: bars.advance(task_id, n)

    bar = __call__

    def for_plan(self, description: str):
        """The progress hook `average_checkpoints` takes: called with the plan, returns the callback."""
        return lambda plan: self(description, plan.output_bytes)

    def count_scores(self, total: int | None) -> Bars:
        """Show a progress line over `total` scores (None: not known in advance)."""
        if self.progress is not None:
            self.score_line = self.progress.add_task("scoring", total=total)
        return self

    def averaged(self, job, folder) -> None:
        if not self.quiet:
            say(f"wrote {folder}")

    def scored(self, target, task: str, status: str, rows) -> None:
        if status.startswith("failed"):
            say(f"[yellow]failed:[/] {target.model} {target.tag} step{target.step} {task}: {status[8:]}")
        if self.score_line is not None:
            self.progress.update(self.score_line, advance=1, description=f"score {target.tag} step{target.step} "
                                 f"{task}")


class Following(Bars):
    """What a follower shows: the outputs it wrote, and each window it had to skip."""

    def __init__(self, quiet: bool) -> None:
        super().__init__(quiet)
        self.written: list = []

    def averaged(self, job, folder) -> None:
        self.written.append(folder)
        super().averaged(job, folder)

    def lost(self, run: str, window) -> None:
        warnings.warn(f"{run}: window at step {window.step} skipped: a member was deleted before it could be kept",
                      CkptavgWarning, stacklevel=2)


def following(run: Callable[[Events], object], out_dir, events: Following, *, scores: bool) -> None:
    """Follow (`run(events)`) until it stops, SIGTERM taken like Ctrl-C (nothing half-written), and say how
    far it got."""
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with events:
            run(events.count_scores(None) if scores else events)
    except KeyboardInterrupt:
        say(f"stopped: {len(events.written)} output(s) written under {out_dir}; run the same command to go on")
        raise typer.Exit(130) from None
    say(f"{len(events.written)} output(s) written under {out_dir}")
