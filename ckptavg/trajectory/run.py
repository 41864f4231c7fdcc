"""A trajectory run: plan every window of a method over a source, then fetch, average and evict in order.

Finished outputs (those with a manifest) are left out of the plan, so an interrupted run
resumes where it stopped and fetches nothing it no longer needs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import MismatchError, MissingStepsError, ScheduleError
from ..layout import RUN_LOG, output_folder, run_folder
from ..manifest import Method, RunId, is_finished
from .schedule import METHODS, FetchPlan, Window, ema_windows, lawa_windows, plan_fetches, steps_of, swa_windows
from .sources import Duplicate


class Source(Protocol):
    name: str
    missing_hint: str  # appended to "window needs steps the trajectory does not have"
    local: bool  # read in place (no downloads, no disk use but the outputs)

    def steps(self) -> list[int]: ...
    def size(self, step: int) -> int: ...
    def label(self, step: int) -> str: ...  # how errors name a step's checkpoint (a revision, a folder)
    def describe(self, step: int) -> dict: ...  # the manifest's provenance fields (`InputRecord`)
    def duplicates(self, steps: list[int], read_data: bool = True) -> list[Duplicate]: ...
    def fetch(self, step: int) -> Path: ...
    def evict(self, step: int) -> None: ...
    def evict_leftovers(self, keep: set[int]) -> list[str]: ...
    def disk_usage(self) -> int: ...


@dataclass(frozen=True)
class RunSpec:
    method: str
    k: int
    nu: int
    interval: int
    start: int
    end: int
    ema_alpha: float = 0.9
    swa_start: int | None = None
    skip_incomplete: bool = False

    def tag(self) -> str:
        base = f"k{self.k}-nu{self.nu}"
        if self.method == "lawa":
            return f"lawa-{base}"
        if self.method == "ema":
            return f"ema-alpha{self.ema_alpha:g}-{base}"
        return f"swa-from{self.swa_start if self.swa_start is not None else 'first'}-{base}"

    def windows(self, available: Sequence[int] | None) -> list[Window]:
        common = dict(k=self.k, nu=self.nu, interval=self.interval, start=self.start, end=self.end,
                      available=available, skip_incomplete=self.skip_incomplete)
        if self.method == "lawa":
            return lawa_windows(**common)
        if self.method == "ema":
            return ema_windows(alpha=self.ema_alpha, **common)
        if self.method == "swa":
            return swa_windows(swa_start=self.swa_start, **common)
        raise ScheduleError(f"unknown --method {self.method!r} (choose from {', '.join(METHODS)})")

    def record(self, window: Window) -> Method:
        params: dict = {}
        if self.method == "ema":
            params = {"alpha": self.ema_alpha, "dropped_tail_weight": window.dropped_weight}
        if self.method == "swa":
            params = {"swa_start": window.members[0]}
        return Method(self.method, window.step, self.k, self.nu, self.interval, window.members, params)


@dataclass(frozen=True)
class RunPlan:
    windows: tuple[Window, ...]  # all windows of the run
    todo: tuple[Window, ...]  # those without a finished output
    fetch: FetchPlan
    out_dirs: dict[int, Path]  # window step -> output folder
    read_bytes: int  # of the checkpoints the windows to do read (downloaded first, unless local)
    run: RunId
    root: Path  # the run's folder: its outputs and its run log


def run_id(source: Source, spec: RunSpec) -> RunId:
    return RunId(source.name, spec.tag())


def plan_run(source: Source, spec: RunSpec, out: Path, *, force: bool = False, keep_downloads: bool = False,
             disk_budget: int | None = None, sizes: dict[int, int] | None = None,
             done: Callable[[Window], bool] | None = None) -> RunPlan:
    """`done(window)` says a window needs no work (default: its output has a manifest)."""
    try:
        windows = spec.windows(source.steps())
    except MissingStepsError as e:
        raise MissingStepsError(f"{e}{source.missing_hint}") from None
    run = run_id(source, spec)
    out_dirs = {w.step: output_folder(out, run, w.step) for w in windows}
    finished = done or (lambda w: is_finished(out_dirs[w.step]))
    todo = [w for w in windows if force or not finished(w)]
    sizes = sizes or {s: source.size(s) for s in steps_of(todo)}
    output_bytes = max((sizes[w.members[-1]] for w in todo), default=0)
    local = getattr(source, "local", False)
    # local checkpoints are on disk already: only the output being written adds to the disk in use
    on_disk = {s: 0 for s in sizes} if local else sizes
    fetch = plan_fetches(todo, on_disk, output_bytes, keep_downloads, disk_budget)
    return RunPlan(tuple(windows), tuple(todo), fetch, out_dirs, sum(sizes[s] for s in steps_of(todo)), run,
                   run_folder(out, run))


def execute_run(source: Source, spec: RunSpec, plan: RunPlan, *, force: bool = False, keep_downloads: bool = False,
                on_window: Callable[[Window, Path], None] | None = None,
                on_fetch: Callable[[int, Path], None] | None = None,
                in_memory: Callable[[Window, list[Path]], None] | None = None,
                bars: Callable[[str, int], Callable[[int], None]] | None = None, **average_kwargs) -> list[Path]:
    """Carry out the plan; `average_kwargs` go to `average_checkpoints` (device, dtype...).

    `on_fetch(step, folder)` runs while a revision is on disk (to score an original without a
    second download); `in_memory(window, folders)` replaces writing the window's output.

    `bars(description, total_bytes)` makes a progress callback, for averaging (and the source's
    downloads). Every action is appended to RUN_LOG next to the outputs, with the bytes the
    source holds on disk after it: the record of a long run, and of its disk budget.
    """
    from ..engine.average import average_checkpoints
    from ..engine.tensors import open_checkpoint

    by_step = {w.step: w for w in plan.todo}
    on_disk: dict[int, Path] = {}
    written = []
    log = _RunLog(plan.root if in_memory is None else None, source)
    if not keep_downloads:
        for commit in source.evict_leftovers(set(steps_of(plan.todo))):
            log.write("evict-leftover", None, revision=commit)
    for action in plan.fetch.actions:
        if action.kind == "fetch":
            on_disk[action.step] = source.fetch(action.step)
            if on_fetch is not None:
                on_fetch(action.step, on_disk[action.step])
        elif action.kind == "average" and in_memory is not None:
            in_memory(by_step[action.step], [on_disk[s] for s in by_step[action.step].members])
        elif action.kind == "evict":
            source.evict(action.step)
            on_disk.pop(action.step, None)
        else:
            w = by_step[action.step]
            progress = (lambda p, s=w.step: bars(f"average step{s}", p.output_bytes)) if bars else None
            try:
                inputs = [open_checkpoint(on_disk[s], label=source.label(s)) for s in w.members]
                written_to = average_checkpoints(inputs, plan.out_dirs[w.step], weights=w.weights, normalize=False,
                                                 force=force, method=spec.record(w), progress=progress,
                                                 provenance=[source.describe(s) for s in w.members], run=plan.run,
                                                 **average_kwargs)
            except MismatchError as e:
                raise MismatchError(f"window at step {w.step}: {e}") from None
            written.append(written_to)
            if on_window is not None:
                on_window(w, written_to)
        log.write(action.kind, action.step, planned_disk=action.disk_after)
    return written


class _RunLog:
    def __init__(self, root: Path | None, source: Source) -> None:
        self.path = root / RUN_LOG if root is not None else None
        self.source = source

    def write(self, action: str, step: int | None, **extra) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": time.time(), "action": action, "step": step, "source_disk": self.source.disk_usage()} | extra
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
