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
from typing import TYPE_CHECKING, Protocol

from ..errors import MismatchError, MissingStepsError
from ..layout import output_folder, run_folder, run_log
from ..manifest import Method, Provenance, RunId, is_finished
from ..storage.paths import RemotePath, location
from .events import QUIET, Events
from .methods import DEFAULT_DECAY_SHAPE, DEFAULT_EMA_ALPHA, method
from .schedule import FetchPlan, Window, plan_fetches, steps_of
from .sources import Duplicate

if TYPE_CHECKING:
    from ..engine.ranks import Group


class Source(Protocol):
    name: str
    missing_hint: str  # appended to "window needs steps the trajectory does not have"
    local: bool  # read in place (no downloads, no disk use but the outputs)

    def steps(self) -> list[int]: ...
    def size(self, step: int) -> int: ...
    def label(self, step: int) -> str: ...  # how errors name a step's checkpoint (a revision, a folder)
    def describe(self, step: int) -> Provenance: ...  # where the step's checkpoint came from, for its manifest
    def duplicates(self, steps: list[int], read_data: bool = True) -> list[Duplicate]: ...
    def fetch(self, step: int) -> Path: ...
    def evict(self, step: int) -> None: ...
    def evict_leftovers(self, keep: set[int]) -> list[str]: ...
    def release(self) -> None: ...  # let go of what it fetched, deleting nothing (other runs may delete it)
    def disk_usage(self) -> int: ...


@dataclass(frozen=True)
class RunSpec:
    """One run: a method (`trajectory.methods`) and its parameters, over output steps start..end."""

    method: str
    k: int
    nu: int
    interval: int
    start: int
    end: int
    ema_alpha: float = DEFAULT_EMA_ALPHA
    swa_start: int | None = None
    skip_incomplete: bool = False
    decay_shape: str = DEFAULT_DECAY_SHAPE
    tokens_per_step: int | None = None  # known: the plan and the manifest also count in tokens

    def tag(self) -> str:
        return method(self.method).tag(self)

    def windows(self, available: Sequence[int] | None) -> list[Window]:
        return method(self.method).windows(self, available)

    def record(self, window: Window) -> Method:
        tokens = {} if self.tokens_per_step is None else {
            "tokens_per_step": self.tokens_per_step, "step_tokens": window.step * self.tokens_per_step,
            "nu_tokens": self.nu * self.tokens_per_step, "interval_tokens": self.interval * self.tokens_per_step}
        return Method(self.method, window.step, self.k, self.nu, self.interval, window.members,
                      method(self.method).record(self, window) | tokens)


@dataclass(frozen=True)
class Job:
    """One window of one run: the unit of averaging work."""

    run: RunId
    spec: RunSpec
    window: Window
    out_dir: Path | RemotePath


@dataclass(frozen=True)
class RunPlan:
    """Every window of one or more runs over one source, in the order they are done, with one fetch plan
    for all of them: a revision several runs need is fetched once and kept until the last of them."""

    jobs: tuple[Job, ...]  # every window of every run
    todo: tuple[Job, ...]  # those without a finished output, in the order they are done
    fetch: FetchPlan  # its "average" actions index into `todo`
    read_bytes: int  # of the checkpoints `todo` reads (downloaded first, unless local)
    roots: dict[RunId, Path | RemotePath]  # each run's folder: its outputs
    log_dir: Path | RemotePath  # where the run log goes: the run's folder, or the trajectory's for several runs

    @property
    def windows(self) -> tuple[Window, ...]:
        return tuple(j.window for j in self.jobs)


def run_id(source: Source, spec: RunSpec) -> RunId:
    return RunId(source.name, spec.tag())


def plan_runs(source: Source, specs: Sequence[RunSpec], out: Path | RemotePath, *, force: bool = False,
              keep_downloads: bool = False, disk_budget: int | None = None, sizes: dict[int, int] | None = None,
              done: Callable[[Job], bool] | None = None, select: Callable[[Job], bool] | None = None) -> RunPlan:
    """Plan `specs` over `source` together. `done(job)` says a window needs no work (default: its output
    has a manifest); `select(job)` keeps only some windows (one cluster job's share of a study). Windows
    are done in order of their newest checkpoint, so that each revision is evicted as soon as every run
    is past it."""
    available = source.steps()
    jobs = []
    for spec in dict.fromkeys(specs):
        try:
            windows = spec.windows(available)
        except MissingStepsError as e:
            raise MissingStepsError(f"{spec.tag()}: {e}{source.missing_hint}" if len(specs) > 1 else
                                    f"{e}{source.missing_hint}") from None
        run = run_id(source, spec)
        jobs += [Job(run, spec, w, output_folder(out, run, w.step)) for w in windows]
    if select is not None:
        jobs = [j for j in jobs if select(j)]
    finished = done or (lambda j: is_finished(j.out_dir))
    todo = sorted((j for j in jobs if force or not finished(j)), key=lambda j: (j.window.members[-1], j.window.step))
    sizes = sizes or {s: source.size(s) for s in steps_of([j.window for j in todo])}
    output_bytes = max((sizes[j.window.members[-1]] for j in todo), default=0)
    # local checkpoints are on disk already: only the output being written adds to the disk in use
    on_disk = {s: 0 for s in sizes} if getattr(source, "local", False) else sizes
    fetch = plan_fetches([j.window for j in todo], on_disk, output_bytes, keep_downloads, disk_budget)
    roots = {j.run: run_folder(out, j.run) for j in jobs}
    log_dir = next(iter(roots.values())) if len(roots) == 1 else location(out) / source.name
    return RunPlan(tuple(jobs), tuple(todo), fetch, sum(sizes[s] for s in steps_of([j.window for j in todo])), roots,
                   log_dir)


def plan_run(source: Source, spec: RunSpec, out: Path | RemotePath, **options) -> RunPlan:
    return plan_runs(source, [spec], out, **options)


def execute_run(source: Source, plan: RunPlan, *, force: bool = False, keep_downloads: bool = False,
                events: Events = QUIET, in_memory: Callable[[Job, list[Path], list[int]], None] | None = None,
                group: Group | None = None, **average_kwargs) -> list[Path]:
    """Carry out the plan, telling `events` as it goes (`fetched` while a revision is on disk, so that an
    original is scored without a second download; `window_inputs` before each window, `averaged` after
    it; `bar` for each average's progress); `average_kwargs` go to `average_checkpoints` (device, dtype...).

    `in_memory(job, folders, reread)` replaces writing the window's output. `reread`, the positions of
    the window's members that a later window reads too, is what `average_checkpoints` is given for the
    average it makes: those inputs are kept in the page cache.

    Every action is appended to the run log (`layout.run_log`), with the bytes the source holds on disk
    after it: the record of a long run, and of its disk budget.

    `group` (the ranks of a torchrun or srun launch, on a shared filesystem): every window is shared by them,
    one after another; rank 0 alone fetches (the others are told where), evicts, logs and tells `events`.
    """
    first = group is None or group.rank == 0
    on_disk: dict[int, Path] = {}
    written = []
    # by action: the positions of its window's members that a later window reads too (one backward pass)
    reread: dict[int, list[int]] = {}
    later: set[int] = set()
    for i in reversed(range(len(plan.fetch.actions))):
        if plan.fetch.actions[i].kind == "average":
            members = plan.todo[plan.fetch.actions[i].window].window.members
            reread[i] = [p for p, s in enumerate(members) if s in later]
            later.update(members)
    log = _RunLog(plan.log_dir if in_memory is None and first else None, source)
    events = events if first else QUIET
    if first and not keep_downloads:
        for commit in source.evict_leftovers(set(steps_of([j.window for j in plan.todo]))):
            log.write("evict-leftover", None, revision=commit)
    try:
        for i, action in enumerate(plan.fetch.actions):
            job = plan.todo[action.window] if action.kind == "average" else None
            if action.kind == "fetch":
                on_disk[action.step] = source.fetch(action.step) if first else None
                if group is not None:
                    on_disk[action.step] = group.from_first(on_disk[action.step])
                events.fetched(action.step, on_disk[action.step])
            elif action.kind == "evict":
                if first:  # (every rank is done with it: the average before committed on all)
                    source.evict(action.step)
                on_disk.pop(action.step, None)
            else:
                folders = [on_disk[s] for s in job.window.members]
                events.window_inputs(job, folders)
                if in_memory is not None:
                    in_memory(job, folders, reread[i])
                else:
                    written_to = _average(source, job, folders, force, events, reread[i],
                                          average_kwargs | ({"ranks": group} if group is not None else {}))
                    written.append(written_to)
                    events.averaged(job, written_to)
            extra = {"run": job.run.tag} if job is not None and len(plan.roots) > 1 else {}
            log.write(action.kind, action.step, planned_disk=action.disk_after, **extra)
    finally:
        source.release()
    return written


def _average(source: Source, job: Job, folders: list[Path], force: bool, events: Events, reread: list[int],
             average_kwargs: dict) -> Path:
    from ..checkpoints.open import open_checkpoint
    from ..engine.average import average_checkpoints

    w = job.window
    try:
        inputs = [open_checkpoint(f, label=source.label(s)) for s, f in zip(w.members, folders, strict=True)]
        return average_checkpoints(inputs, job.out_dir, weights=w.weights, normalize=False, force=force,
                                   method=job.spec.record(w),
                                   progress=lambda p: events.bar(f"average step{w.step}", p.output_bytes),
                                   provenance=[source.describe(s) for s in w.members], run=job.run,
                                   reread=reread, **average_kwargs)
    except MismatchError as e:
        raise MismatchError(f"window at step {w.step}: {e}") from None


class _RunLog:
    def __init__(self, root: Path | RemotePath | None, source: Source) -> None:
        self.path = run_log(root) if root is not None else None
        self.source = source
        self.lines: list[str] = []  # on a store: this process's log so far, put whole after each action

    def write(self, action: str, step: int | None, **extra) -> None:
        if self.path is None:
            return
        record = {"time": time.time(), "action": action, "step": step, "source_disk": self.source.disk_usage()} | extra
        if isinstance(self.path, RemotePath):
            self.lines.append(json.dumps(record) + "\n")
            self.path.write_text("".join(self.lines))
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
