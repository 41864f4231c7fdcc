"""Trajectories: opening one (local, a URL, the Hub, Pythia), running every window of some runs over it, and
following it while it trains."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..checkpoints.layouts import DEFAULT_STEP_PATTERN
from ..engine.ranks import joined
from ..errors import OptionError
from ..manifest import is_finished
from ..options import output_tree
from ..storage.paths import RemotePath, location
from ..trajectory.catalogue import CatalogueTrajectory
from ..trajectory.events import QUIET, Broadcast, Events
from ..trajectory.follow import FollowOptions
from ..trajectory.methods import check_parameters
from ..trajectory.run import Job, RunPlan, RunSpec, execute_run, plan_runs
from ..trajectory.schedule import Window, steps_of
from ..trajectory.sources import Duplicate
from .scores import scorer_for, tracked_events
from .settings import Averaging, ByteBar, Scoring, torch_dtype


def open_trajectory(source: str | Path, pattern: str | None = None, *, cache_dir: Path | None = None,
                    bars: ByteBar | None = None):
    """A local run folder (its steps named by `pattern`, or as its trainer names them), or a Hub repo
    (ORG/NAME) whose branches are steps (`pattern`, by default step(\\d+))."""
    from ..storage import is_url
    from ..storage.paths import location
    from ..trajectory.hub import HubTrajectory, looks_like_repo_id
    from ..trajectory.sources import LocalTrajectory

    if is_url(source) or Path(source).is_dir():  # a run's folder, on disk or on an object store
        return LocalTrajectory(location(source), pattern)
    if looks_like_repo_id(str(source)) and not Path(source).exists():
        return HubTrajectory(str(source), pattern or DEFAULT_STEP_PATTERN, cache_dir=cache_dir, bars=bars)
    raise OptionError(f"{source}: neither a local trajectory folder nor a Hub repo id (ORG/NAME)")


def pythia_trajectory(size: str, deduped: bool = True, *, cache_dir: Path | None = None, bars: ByteBar | None = None):
    from ..trajectory import pythia
    from ..trajectory.hub import HubTrajectory

    return HubTrajectory(pythia.model(size).repo_id(deduped), cache_dir=cache_dir, bars=bars)


@dataclass(frozen=True)
class TrajectoryRun:
    plan: RunPlan
    duplicates: tuple[Duplicate, ...]
    written: tuple[Path, ...] = ()
    scored: int = 0  # task scores written
    failed: int = 0


def run_trajectory(source, specs: RunSpec | Sequence[RunSpec], out: str | Path | RemotePath,
                   averaging: Averaging = Averaging(),
                   scoring: Scoring | None = None, *, dry_run: bool = False, events: Events = QUIET,
                   select: Callable[[Job], bool] | None = None) -> TrajectoryRun:
    """Plan every window of `specs` (one run or several) over `source`, check the revisions for
    duplicates, then (unless `dry_run`) fetch, average, score and evict in order: a revision several
    runs need is fetched once. Finished windows are skipped (with `scoring.in_memory`: windows whose
    every task is stored), so an interrupted run resumes.

    `events` (`trajectory.events.Events`) hears the plan before anything is fetched, each output
    written, each (checkpoint, task) scored, and gives the progress bars; `select(job)` keeps only some
    windows (a cluster job's share of a study). `out` may be a URL: the outputs (and each process's run
    log) are put on the store, for averaging alone (`options.output_tree`)."""
    specs = [specs] if isinstance(specs, RunSpec) else list(specs)
    averaging = averaging.checked(dry_run)
    for spec in specs:
        check_parameters(spec.method, spec.k, spec.nu, spec.interval, spec.ema_alpha, spec.decay_shape)
    scoring = scoring if scoring and scoring.tasks else None
    if scoring is not None and averaging.ranks is not None:  # every rank averages; rank 0 alone scores
        if scoring.in_memory:
            raise OptionError("scoring in memory keeps no average for the ranks to share: leave out --in-memory")
        scoring = scoring if averaging.ranks.rank == 0 else None
    out = output_tree(out, "out", needs_filesystem="scoring" if scoring is not None else None)
    if scoring is not None and not dry_run:
        scoring = scoring.registered()
    store = None
    if scoring is not None and not dry_run:  # a dry run writes nothing, not even an empty results store
        from ..report.store import Store

        store = Store(scoring.results)
    try:
        done = None
        if store is not None and scoring.in_memory:
            done = lambda j: all(store.done(j.run.model, j.run.tag, j.window.step, t, scoring.limit or 0)  # noqa: E731
                                 for t in scoring.tasks)
        sizes = source.sizes() if isinstance(source, CatalogueTrajectory) else None
        plan = plan_runs(source, specs, out, force=averaging.force, keep_downloads=averaging.keep_downloads,
                         disk_budget=averaging.disk_budget, sizes=sizes, done=done, select=select)
        # only the revisions still to be read: a resumed run does not re-check what it is done with
        to_read = steps_of([j.window for j in plan.todo])
        # (rank 0 says what is duplicated: the others would only ask the Hub the same again)
        speaks = averaging.ranks is None or averaging.ranks.rank == 0
        duplicates = [] if sizes is not None or not speaks else source.duplicates(to_read, read_data=not dry_run)
        events.planned(plan, duplicates)
        if dry_run:
            return TrajectoryRun(plan, tuple(duplicates))
        with tracked_events(scoring, events) as (scoring, events), joined(averaging.ranks, averaging.timeout) as group:
            return _execute(source, plan, duplicates, averaging, scoring, store, events, group)
    finally:
        if store is not None:
            store.close()


def follow_trajectory(root, spec: RunSpec | Sequence[RunSpec], out: str | Path,
                      averaging: Averaging = Averaging(), scoring: Scoring | None = None,
                      options: FollowOptions | None = None, *, pattern: str | None = None,
                      events: Events = QUIET) -> int:
    """`run_trajectory` over a run folder (local, or a URL; or a Hub trajectory whose trainer pushes each
    checkpoint as a branch) while its trainer writes it (`trajectory/follow.py`):
    each window averaged (and scored) once its newest member is complete, members kept from the trainer's
    deletions until their last window is done (within `averaging.disk_budget`, which a store's steps need
    to be kept at all); until `options.until`, `options.idle_timeout` or Ctrl-C. `spec.end` is ignored
    (the run's latest step, or `until`). Returns how many rounds it ran."""
    return follow_trajectories([(root, spec, pattern)], out, averaging, scoring, options, events=events)


def follow_trajectories(runs: Sequence[tuple[object, RunSpec | Sequence[RunSpec], str | None]], out: str | Path,
                        averaging: Averaging = Averaging(), scoring: Scoring | None = None,
                        options: FollowOptions | None = None, *, events: Events = QUIET) -> int:
    """`follow_trajectory` for several sources at once, each with its own runs and step pattern (`study run
    --follow`): every source is scanned each time round, and trackers are opened once. A source is a run
    folder (a path or URL) or an opened Hub trajectory (`open_trajectory("ORG/NAME")`), whose branches are
    listed again each time."""
    from ..layout import output_folder
    from ..manifest import RunId
    from ..trajectory.follow import Followed, FollowedRepo, follow
    from ..trajectory.hub import HubTrajectory

    if scoring is not None and scoring.in_memory:
        raise OptionError("--follow writes each window's average (scoring in memory keeps none): drop --in-memory")
    averaging, out = averaging.checked(), output_tree(out, "out", needs_filesystem="following a run")
    first_round: dict[str, bool] = {}

    with tracked_events(scoring, events) as (scoring, events):

        def rounds_of(name: str):
            def run_round(source, specs: list[RunSpec], keep_fetched: bool) -> None:
                # --force redoes what was there before following began, not what the first round made
                this_round = averaging if first_round.setdefault(name, True) else replace(averaging, force=False)
                run_trajectory(source, specs, out, replace(this_round, keep_downloads=this_round.keep_downloads
                                                           or keep_fetched), scoring, events=events)
                first_round[name] = False

            def finished(spec: RunSpec, window: Window) -> bool:
                return is_finished(output_folder(out, RunId(name, spec.tag()), window.step))

            return run_round, finished

        followed = []
        for root, specs, pattern in runs:
            specs = [specs] if isinstance(specs, RunSpec) else list(specs)
            if isinstance(root, HubTrajectory):
                followed.append(FollowedRepo(root, specs, *rounds_of(root.name), events))
                continue
            root = location(root)
            followed.append(Followed(root, specs, out, *rounds_of(root.name), pattern, events, averaging.disk_budget))
        return follow(followed, options or FollowOptions())


def _execute(source, plan: RunPlan, duplicates, averaging: Averaging, scoring: Scoring | None, store,
             events: Events, group=None) -> TrajectoryRun:
    out_dtype = torch_dtype(averaging.dtype)
    listeners, in_memory, scorer = events, None, None
    if scoring is not None:
        from ..evaluation.scorer import study_listeners

        scorer = scorer_for(scoring, store, averaging.device, averaging.force, events)
        scoring_listeners, in_memory = study_listeners(
            source.name, {j.window.step for j in plan.todo}, scorer, originals=scoring.originals,
            in_memory=scoring.in_memory, out_dtype=out_dtype, diversity=scoring.diversity, copy=averaging.copy)
        listeners = Broadcast(events, scoring_listeners)
    written = execute_run(source, plan, force=averaging.force, keep_downloads=averaging.keep_downloads,
                          device=averaging.device, out_dtype=out_dtype, copy=averaging.copy,
                          output_format=averaging.output_format, events=listeners, in_memory=in_memory,
                          group=group)
    if scorer is not None and not scoring.in_memory:  # the averages, and originals not scored on the way
        from ..evaluation.scorer import run_eval
        from ..evaluation.targets import find_targets

        for root in plan.roots.values():
            steps = {j.window.step for j in plan.jobs if j.out_dir.parent == root}
            run_eval(find_targets(root, steps, scoring.originals), scorer)
    return TrajectoryRun(plan, tuple(duplicates), tuple(written), scorer.scored if scorer else 0,
                         scorer.failed if scorer else 0)
