"""A whole study from one file: every source, every run of the grid, scored as it goes, with each revision
fetched once for all the runs that need it.

    from ckptavg import study
    s = study.load_study("examples/studies/paper.toml")
    for p in study.plan_study(s):            # offline for Pythia sources; a listing for other Hub repos
        print(p.source, p.plan.fetch.download_bytes, p.plan.fetch.peak_disk)
    study.run_study(s)                       # on this machine; finished work is skipped
    for row in study.study_status(s):
        print(row)

The file format is documented in `ckptavg.study.file`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..api import Averaging, ByteBar, CatalogueTrajectory, pythia_trajectory, run_trajectory
from ..api import scoring as checked_scoring
from ..manifest import is_finished
from ..storage.paths import location
from ..trajectory.events import QUIET, Events, byte_bar
from ..trajectory.follow import FollowOptions
from ..trajectory.run import RunPlan, RunSpec
from .file import SourceEntry, StudyFile, load_study

__all__ = ["SourcePlan", "StatusRow", "StudyFile", "follow_study", "load_study", "plan_study", "run_study",
           "study_status", "submit_study"]


@dataclass(frozen=True)
class SourcePlan:
    source: str  # the trajectory's name
    specs: tuple[RunSpec, ...]
    plan: RunPlan
    duplicates: tuple
    trajectory: object = field(default=None, compare=False, repr=False)  # the opened source the plan was made on


def _open(entry: SourceEntry, *, offline_catalogue: bool, bars: ByteBar | None = None):
    """The source a study file names; a Pythia size plans from the catalogue (offline) and runs from the Hub."""
    if entry.kind == "pythia":
        return (CatalogueTrajectory(entry.name, entry.deduped) if offline_catalogue
                else pythia_trajectory(entry.name, entry.deduped, cache_dir=entry.cache_dir, bars=bars))
    if entry.kind == "local":
        from ..trajectory.sources import LocalTrajectory

        return LocalTrajectory(location(entry.name, entry.storage_options), entry.steps_from)
    from ..checkpoints.layouts import DEFAULT_STEP_PATTERN
    from ..trajectory.hub import HubTrajectory

    return HubTrajectory(entry.name, entry.steps_from or DEFAULT_STEP_PATTERN, cache_dir=entry.cache_dir, bars=bars)


def _averaging(s: StudyFile, force: bool = False) -> Averaging:
    return Averaging(s.device, s.dtype, s.disk_budget, s.copy, s.keep_downloads, force, s.output_format)


def _scoring(s: StudyFile, register: bool):
    if not s.scoring.get("tasks"):
        return None
    options = {k: v for k, v in s.scoring.items() if k != "tasks"}
    return checked_scoring(s.scoring["tasks"], s.results, register=register, device=s.device,
                           tracking=s.tracking or None, **options)


def plan_study(s: StudyFile, on_plan: Callable[[SourcePlan], None] | None = None, *, offline: bool = True,
               bars: ByteBar | None = None) -> list[SourcePlan]:
    """Every source's plan, from listings only (with `offline`, Pythia sources plan from the built-in
    catalogue); checks the disk budget and the averaging settings (scoring's files are checked when the
    study runs: a plan can be made where they are not). Reads no tensor data and writes nothing."""
    averaging = _averaging(s).checked(dry_run=True)
    plans = []
    for entry in s.sources:
        source = _open(entry, offline_catalogue=offline, bars=bars)
        specs = entry.specs(s.grid, source.steps())
        run = run_trajectory(source, specs, s.out, averaging, dry_run=True)
        plans.append(SourcePlan(source.name, tuple(specs), run.plan, run.duplicates, source))
        if on_plan is not None:
            on_plan(plans[-1])
    return plans


def run_study(s: StudyFile, *, force: bool = False, events: Events = QUIET):
    """Run the study on this machine, source by source; each source's revisions are fetched once for every
    run of the grid. Everything is checked first (settings, every source's plan and the disk budget), then
    work starts; `events` hears each source's run as `run_trajectory` tells it. Returns each source's
    `api.TrajectoryRun`."""
    averaging, scoring = _averaging(s, force).checked(), _scoring(s, register=True)
    # every error a study file can hold, before the first download; the sources opened (and listed) for it
    # are the ones the run uses, so a Hub repo is listed once
    plans = plan_study(s, offline=False, bars=byte_bar(events))
    return [run_trajectory(p.trajectory, p.specs, s.out, averaging, scoring, events=events) for p in plans]


def follow_study(s: StudyFile, options: FollowOptions, *, force: bool = False, events: Events = QUIET) -> int:
    """Run the study while its local sources train (`api.follow_trajectories`): every run of the grid on
    every source, each window averaged (and scored, and logged) once its newest checkpoint is complete,
    until `options` says stop. Sources are run folders (local or on a store) or Hub repos, not Pythia.
    Returns how many rounds ran."""
    from ..api import follow_trajectories
    from ..errors import OptionError
    from ..trajectory.follow import complete_steps

    averaging, scoring = _averaging(s, force).checked(), _scoring(s, register=True)
    runs = []
    for entry in s.sources:
        if entry.kind == "pythia":
            raise OptionError(f"--follow watches runs still training; Pythia {entry.name} is finished: drop --follow")
        if entry.kind == "hub":  # a trainer pushing each checkpoint as a branch
            root = _open(entry, offline_catalogue=False, bars=byte_bar(events))
            runs.append((root, entry.specs(s.grid, root.steps()), entry.steps_from))
            continue
        root = location(entry.name, entry.storage_options)
        if not root.is_dir():
            raise OptionError(f"--follow watches run folders (local or on an object store) and Hub repos; "
                              f"{entry.name} is none")
        steps = complete_steps(root, entry.steps_from)
        if not steps and not entry.explicit_start:
            raise OptionError(f"{entry.name} has no complete checkpoint yet: give [steps] start, the first output "
                              f"step")
        runs.append((root, entry.specs(s.grid, steps or [entry.steps["start"]]), entry.steps_from))
    return follow_trajectories(runs, s.out, averaging, scoring, options, events=events)


def uncached_tasks(s: StudyFile) -> list:
    """The study's tasks whose Hub data the datasets cache lacks (`evaluation.taskdata.TaskData`); the PILE
    subsets and --ppl-task files are local. Registers the tasks with lm-eval (seconds)."""
    from ..evaluation.taskdata import cached

    return [d for d in _hub_task_data(s) if not cached(d)]


def _hub_task_data(s: StudyFile) -> list:
    """The study's tasks that read their data from the Hub, as lm-eval's configs name it."""
    from ..api import task_sources
    from ..evaluation.tasks import PILE_SUBSETS

    if not s.scoring.get("tasks"):
        return []
    options = {k: v for k, v in s.scoring.items() if k not in ("tasks", "pile")}
    tasks = [t for t in s.scoring["tasks"] if t not in PILE_SUBSETS]  # (from a local file, found or not)
    if not tasks:
        return []
    checked = checked_scoring(tasks, s.results, register=False, device=s.device, **options)
    return [d for d in task_sources(checked) if d.on_hub]


def _offline_jobs(s: StudyFile, scoring, fetch: bool) -> tuple[str, ...]:
    """What the study's jobs can run without: the Hub's datasets once every task's data is cached (fetched
    here first with `fetch`), and the Hub itself when no source is on it either."""
    if scoring is None:
        return ()
    import warnings

    from ..errors import CkptavgWarning
    from ..evaluation.taskdata import cached

    sources = _hub_task_data(s)  # (the task index is built once: it takes seconds)
    if fetch:
        from ..api import fetch_task_data

        fetch_task_data(sources)
    missing = [d for d in sources if not cached(d)]
    if missing:
        warnings.warn(f"the jobs will download the data of {', '.join(d.task for d in missing)} (not in the cache "
                      f"here): --fetch-tasks fetches it once, before submitting", CkptavgWarning, stacklevel=3)
        return ()
    from ..storage import is_url

    on_hub = any(e.kind != "local" or is_url(e.name) for e in s.sources)
    return ("HF_DATASETS_OFFLINE",) if on_hub else ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@dataclass(frozen=True)
class StatusRow:
    source: str
    run: str  # the run's tag
    windows: int
    finished: int  # outputs with a manifest
    scored: int | None  # windows whose every task is in the results store (None: the study scores nothing)

    @property
    def pending(self) -> int:
        return self.windows - self.finished


def study_status(s: StudyFile) -> list[StatusRow]:
    """Per source and run: how many windows there are, how many outputs are finished and how many are scored."""
    from ..report.store import open_results

    tasks = list(s.scoring.get("tasks") or [])
    limit = s.scoring.get("limit") or 0
    store = open_results(s.results) if tasks and Path(s.results).is_file() else None
    rows = []
    try:
        for p in plan_study(s):
            for spec in p.specs:
                jobs = [j for j in p.plan.jobs if j.spec == spec]
                scored = None
                if tasks:
                    scored = sum(store is not None and all(store.done(j.run.model, j.run.tag, j.window.step, t, limit)
                                                           for t in tasks) for j in jobs)
                rows.append(StatusRow(p.source, spec.tag(), len(jobs), sum(is_finished(j.out_dir) for j in jobs),
                                      scored))
    finally:
        if store is not None:
            store.close()
    return rows


def submit_study(s: StudyFile, options=None) -> dict:
    """Run the study on a Slurm cluster through submitit (see `ckptavg.study.slurm`): checks everything,
    submits one job array, waits for it, and folds the jobs' results into the study's store. Returns the
    totals (outputs written, scores written, failed scores, and with [tracking] the points logged, from
    the merged store); raises `JobsFailedError` naming the jobs that
    did not finish."""
    from .slurm import SlurmOptions, collect, submit

    options = (options or SlurmOptions()).checked()
    _averaging(s).checked(dry_run=True)  # the submitting machine need not have the jobs' GPUs
    scoring = _scoring(s, register=True)
    offline = _offline_jobs(s, scoring, options.fetch_tasks)
    totals = collect(s, submit(s, options, plan_study(s), offline))
    if scoring is not None and scoring.tracking:
        from ..api import export_scores

        totals["logged"] = export_scores(s.results, scoring.tracking)
    return totals
