"""What a run says as it goes, to whoever listens: progress bars, scoring as it goes, the diversity measure,
a follower's report, trackers.

One typed listener class instead of a callback per occasion: a new listener (a tracker, a test) overrides
the moments it cares about, and the code that runs the work calls `events.x(...)` without knowing who
listens. `Broadcast` hands each moment to several listeners in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..evaluation.targets import Target
    from ..report.store import Row
    from .run import Job, RunPlan
    from .schedule import Window
    from .sources import Duplicate

Advance = Callable[[int], None]


class Events:
    """A listener: every moment does nothing here; override the ones you need."""

    def planned(self, plan: RunPlan, duplicates: Sequence[Duplicate]) -> None:
        """A run's plan is made, before anything is fetched or read."""

    def fetched(self, step: int, folder: Path) -> None:
        """A checkpoint is on disk (downloaded, or local), until its last window is done."""

    def window_inputs(self, job: Job, folders: Sequence[Path]) -> None:
        """A window is about to be averaged; every member is on disk."""

    def averaged(self, job: Job, folder: Path) -> None:
        """A window's output is written and finished (its manifest is there)."""

    def lost(self, run: str, window: Window) -> None:
        """A followed run's trainer deleted a member of this window of `run` (a tag) before it could be kept:
        the window is skipped."""

    def scored(self, target: Target, task: str, status: str, rows: Sequence[Row]) -> None:
        """One checkpoint x task: "skipped" (stored already), "done" or "failed: why"; `rows` as stored (none
        when skipped)."""

    def bar(self, description: str, total: int) -> Advance | None:
        """Progress over `total` bytes (a download, an average): returns what to call with each chunk done."""
        return None


class Broadcast(Events):
    """Several listeners as one, each told in the order given."""

    def __init__(self, *listeners: Events | None) -> None:
        self.listeners = [e for e in listeners if e is not None]

    def _tell(self, moment: str, *args) -> None:
        for e in self.listeners:
            getattr(e, moment)(*args)

    def planned(self, plan, duplicates) -> None:
        self._tell("planned", plan, duplicates)

    def fetched(self, step, folder) -> None:
        self._tell("fetched", step, folder)

    def window_inputs(self, job, folders) -> None:
        self._tell("window_inputs", job, folders)

    def averaged(self, job, folder) -> None:
        self._tell("averaged", job, folder)

    def lost(self, run, window) -> None:
        self._tell("lost", run, window)

    def scored(self, target, task, status, rows) -> None:
        self._tell("scored", target, task, status, rows)

    def bar(self, description, total) -> Advance | None:
        bars = [b for b in (e.bar(description, total) for e in self.listeners) if b is not None]
        if len(bars) <= 1:
            return bars[0] if bars else None
        return lambda n: [b(n) for b in bars] and None


QUIET = Events()


def byte_bar(events: Events) -> Callable[[str, int], Advance]:
    """`events.bar` as the sources and the engine take it: always a callable, a no-op when nobody listens."""

    def bar(description: str, total: int) -> Advance:
        return events.bar(description, total) or (lambda n: None)

    return bar
