"""Everything the command line does, as functions. The CLI parses options, calls these, and prints.

    from ckptavg import api
    avg = api.Averaging(device="cpu")
    run = api.run_trajectory(api.open_trajectory("runs/my-run"), api.RunSpec("lawa", 5, 1000, 3000, 5000, 20000),
                             "out", avg)
    api.evaluate("out", api.scoring("heldout", "results.sqlite", ppl_task=["heldout=heldout.jsonl"]))

Settings are checked when they are made (`scoring`, `Averaging.checked`), so that a bad one fails
before anything is listed, fetched or written; pass them to the functions that do the work.
Averaging itself is `ckptavg.average_checkpoints` and `ckptavg.average_in_memory`. Importing this
module imports no torch: planning and dry runs run anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import options as opt
from .checkpoints.layouts import DEFAULT_STEP_PATTERN
from .errors import OptionError, SavingsError
from .manifest import Method, is_finished, read_manifest
from .report.tracking import Tracking
from .storage.paths import RemotePath, location
from .trajectory.events import QUIET, Broadcast, Events
from .trajectory.follow import FollowOptions
from .trajectory.methods import check_parameters
from .trajectory.run import Job, RunPlan, RunSpec, execute_run, plan_runs
from .trajectory.schedule import Window, steps_of
from .trajectory.sources import Duplicate

ByteBar = Callable[[str, int], Callable[[int], None]]  # (description, total bytes) -> advance(n)


def torch_dtype(name: str):
    """A dtype name checked by `options.choice`, as torch's (None for auto)."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def resolve_device(name: str) -> str:
    """The syntax, and whether a CUDA device asked for is really there (this imports torch)."""
    from .engine.pipeline import resolve_device as resolve

    return str(resolve(opt.device(name)))


# -- scoring settings -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scoring:
    """What to score with and how; made by `scoring()`, which checks every value first."""

    tasks: tuple[str, ...]
    results: Path
    pile: Path | None = None
    ppl_files: dict[str, Path] = field(default_factory=dict)
    include_path: tuple[Path, ...] = ()
    limit: int | None = None
    batch_size: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    originals: bool = True
    in_memory: bool = False
    fresh_model: bool = False  # build a model per checkpoint instead of swapping weights into one (same scores)
    diversity: Path | None = None  # a text: also measure how consecutive window members disagree on it
    tracking: Tracking | None = None  # trackers each score is logged to as it is stored (`report/tracking.py`)
    manager: object = None  # lm-eval's TaskManager, every task registered; None until `registered()`

    def registered(self) -> Scoring:
        return self if self.manager is not None else replace(self, manager=_register_tasks(self))


def scoring(tasks: str | Iterable[str], results: str | Path = "results.sqlite", *, pile: Path | None = None,
            ppl_task: Sequence[str] = (), include_path: Sequence[Path] = (), limit: int | None = None,
            batch_size: str = "auto", device: str = "auto", dtype: str = "auto", originals: bool = True,
            in_memory: bool = False, fresh_model: bool = False, diversity: Path | None = None,
            tracking: Tracking | None = None, register: bool = True) -> Scoring:
    """Checked scoring settings. `register` also registers the tasks with lm-eval, which is what finds an
    unknown task name (a dry run can skip it: importing lm-eval and indexing its tasks takes seconds)."""
    from .evaluation.tasks import PILE_SUBSETS

    task_list = opt.tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    pile_wanted = [t for t in task_list if t in PILE_SUBSETS]
    if pile_wanted and pile is None:
        raise OptionError(f"{', '.join(pile_wanted)} need --pile FILE (a local Pile-format file; the Pile itself "
                          f"can no longer be downloaded), or leave them out of the tasks")
    checked = Scoring(tuple(task_list), Path(results), opt.existing_file(pile, "--pile"),
                      opt.named_files(ppl_task, "--ppl-task"), tuple(opt.existing_dirs(include_path, "--include-path")),
                      opt.limit(limit), opt.batch_size(batch_size), opt.device(device),
                      opt.choice(dtype, opt.EVAL_DTYPES, "--dtype"), originals, in_memory, fresh_model,
                      opt.existing_file(diversity, "--diversity"), tracking.checked() if tracking else None)
    return checked.registered() if register else checked


def _register_tasks(s: Scoring):
    """lm-eval's task index with our perplexity tasks in it (PILE subsets cut from the Pile file, --ppl-task files)."""
    from .evaluation.harness import check_tasks, quiet_lm_eval, task_manager
    from .evaluation.tasks import PILE_SUBSETS, perplexity_tasks, pile_tasks

    quiet_lm_eval()
    paths = list(s.include_path)
    pile_wanted = [t for t in s.tasks if t in PILE_SUBSETS]
    if pile_wanted:
        paths.append(pile_tasks(s.pile, pile_wanted))
    if s.ppl_files:
        paths.append(perplexity_tasks(s.ppl_files))
    manager = task_manager(paths, s.tasks)
    check_tasks(manager, s.tasks)
    from .evaluation.taskdata import check

    check(manager, s.tasks)  # a task whose data cannot load here fails now, not once per checkpoint
    return manager


def task_sources(scoring: Scoring) -> list:
    """Where each task's data comes from (`evaluation.taskdata.TaskData`: repo, config, splits), as lm-eval's
    configs say; the PILE subsets and --ppl-task files are local. Registers the tasks, checking nothing
    about their data (that is what this is for)."""
    from .evaluation.harness import check_tasks, quiet_lm_eval, task_manager
    from .evaluation.taskdata import task_data
    from .evaluation.tasks import PILE_SUBSETS, perplexity_tasks, pile_tasks

    quiet_lm_eval()
    paths = list(scoring.include_path)
    pile_wanted = [t for t in scoring.tasks if t in PILE_SUBSETS]
    if pile_wanted:
        paths.append(pile_tasks(scoring.pile, pile_wanted))
    if scoring.ppl_files:
        paths.append(perplexity_tasks(scoring.ppl_files))
    manager = task_manager(paths, scoring.tasks)
    check_tasks(manager, scoring.tasks)
    return task_data(manager, scoring.tasks)


def fetch_task_data(sources: Sequence, on_fetch: Callable[[object], None] | None = None) -> int:
    """Download and prepare every Hub dataset of `sources` (`task_sources`) not in the cache yet, into the
    caches later runs read (`HF_HOME`), on a machine with a network. Returns how many were fetched."""
    from .evaluation.taskdata import cached, fetch

    done = 0
    for d in sources:
        if d.on_hub and not cached(d):
            if on_fetch is not None:
                on_fetch(d)
            fetch(d)
            done += 1
    return done


# -- trajectories -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Averaging:
    """How a trajectory run averages and fetches. `checked()` validates every value (and, for a real run,
    finds out whether the device is there) before any listing or download."""

    device: str = "auto"
    dtype: str = "auto"  # auto (as stored), float16, bfloat16, float32, float64
    disk_budget: int | str | None = None  # bytes, or a size such as "200GB"
    copy: tuple[str, ...] = ()  # fnmatch patterns of tensors to copy from the newest input, never average
    keep_downloads: bool = False
    force: bool = False  # redo finished outputs
    output_format: str = "auto"  # auto (the inputs' own: DCP, a trainer's file; else safetensors), or one

    def checked(self, dry_run: bool = False) -> Averaging:
        budget = opt.size(self.disk_budget, "--disk-budget") if isinstance(self.disk_budget, str) else self.disk_budget
        return replace(self, device=opt.device(self.device) if dry_run else resolve_device(self.device),
                       dtype=opt.choice(self.dtype, opt.AVERAGE_DTYPES, "--dtype"), disk_budget=budget,
                       copy=opt.copy_patterns(self.copy),
                       output_format=opt.choice(self.output_format, opt.OUTPUT_FORMATS, "--output-format"))


def open_trajectory(source: str | Path, pattern: str | None = None, *, cache_dir: Path | None = None,
                    bars: ByteBar | None = None):
    """A local run folder (its steps named by `pattern`, or as its trainer names them), or a Hub repo
    (ORG/NAME) whose branches are steps (`pattern`, by default step(\\d+))."""
    from .storage import is_url
    from .storage.paths import location
    from .trajectory.hub import HubTrajectory, looks_like_repo_id
    from .trajectory.sources import LocalTrajectory

    if is_url(source) or Path(source).is_dir():  # a run's folder, on disk or on an object store
        return LocalTrajectory(location(source), pattern)
    if looks_like_repo_id(str(source)) and not Path(source).exists():
        return HubTrajectory(str(source), pattern or DEFAULT_STEP_PATTERN, cache_dir=cache_dir, bars=bars)
    raise OptionError(f"{source}: neither a local trajectory folder nor a Hub repo id (ORG/NAME)")


def pythia_trajectory(size: str, deduped: bool = True, *, cache_dir: Path | None = None, bars: ByteBar | None = None):
    from .trajectory import pythia
    from .trajectory.hub import HubTrajectory

    return HubTrajectory(pythia.model(size).repo_id(deduped), cache_dir=cache_dir, bars=bars)


@dataclass(frozen=True)
class CatalogueTrajectory:
    """A Pythia repo as the built-in catalogue describes it (revisions, approximate fp16 sizes): what a
    dry run plans from, offline."""

    size: str
    deduped: bool = True
    missing_hint = ""
    local = False

    @property
    def name(self) -> str:
        from .trajectory import pythia

        return pythia.model(self.size).repo_id(self.deduped).split("/")[1]

    def steps(self) -> list[int]:
        from .trajectory import pythia

        return pythia.steps()

    def sizes(self) -> dict[int, int]:
        from .trajectory import pythia

        return dict.fromkeys(self.steps(), pythia.model(self.size).fp16_bytes)


@dataclass(frozen=True)
class TrajectoryRun:
    plan: RunPlan
    duplicates: tuple[Duplicate, ...]
    written: tuple[Path, ...] = ()
    scored: int = 0  # task scores written
    failed: int = 0


def run_trajectory(source, specs: RunSpec | Sequence[RunSpec], out: str | Path, averaging: Averaging = Averaging(),
                   scoring: Scoring | None = None, *, dry_run: bool = False, events: Events = QUIET,
                   select: Callable[[Job], bool] | None = None) -> TrajectoryRun:
    """Plan every window of `specs` (one run or several) over `source`, check the revisions for
    duplicates, then (unless `dry_run`) fetch, average, score and evict in order: a revision several
    runs need is fetched once. Finished windows are skipped (with `scoring.in_memory`: windows whose
    every task is stored), so an interrupted run resumes.

    `events` (`trajectory.events.Events`) hears the plan before anything is fetched, each output
    written, each (checkpoint, task) scored, and gives the progress bars; `select(job)` keeps only some
    windows (a cluster job's share of a study)."""
    specs = [specs] if isinstance(specs, RunSpec) else list(specs)
    averaging = averaging.checked(dry_run)
    for spec in specs:
        check_parameters(spec.method, spec.k, spec.nu, spec.interval, spec.ema_alpha, spec.decay_shape)
    scoring = scoring if scoring and scoring.tasks else None
    if scoring is not None and not dry_run:
        scoring = scoring.registered()
    store = None
    if scoring is not None and not dry_run:  # a dry run writes nothing, not even an empty results store
        from .report.store import Store

        store = Store(scoring.results)
    try:
        done = None
        if store is not None and scoring.in_memory:
            done = lambda j: all(store.done(j.run.model, j.run.tag, j.window.step, t, scoring.limit or 0)  # noqa: E731
                                 for t in scoring.tasks)
        sizes = source.sizes() if isinstance(source, CatalogueTrajectory) else None
        plan = plan_runs(source, specs, Path(out), force=averaging.force, keep_downloads=averaging.keep_downloads,
                         disk_budget=averaging.disk_budget, sizes=sizes, done=done, select=select)
        # only the revisions still to be read: a resumed run does not re-check what it is done with
        to_read = steps_of([j.window for j in plan.todo])
        duplicates = [] if sizes is not None else source.duplicates(to_read, read_data=not dry_run)
        events.planned(plan, duplicates)
        if dry_run:
            return TrajectoryRun(plan, tuple(duplicates))
        with _tracked(scoring, events) as (scoring, events):
            return _execute(source, plan, duplicates, averaging, scoring, store, events)
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
    from .layout import output_folder
    from .manifest import RunId
    from .trajectory.follow import Followed, FollowedRepo, follow
    from .trajectory.hub import HubTrajectory

    if scoring is not None and scoring.in_memory:
        raise OptionError("--follow writes each window's average (scoring in memory keeps none): drop --in-memory")
    averaging, out = averaging.checked(), Path(out)
    first_round: dict[str, bool] = {}

    with _tracked(scoring, events) as (scoring, events):

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
             events: Events) -> TrajectoryRun:
    out_dtype = torch_dtype(averaging.dtype)
    listeners, in_memory, scorer = events, None, None
    if scoring is not None:
        from .evaluation.scorer import study_listeners

        scorer = _scorer(scoring, store, averaging.device, averaging.force, events)
        scoring_listeners, in_memory = study_listeners(
            source.name, {j.window.step for j in plan.todo}, scorer, originals=scoring.originals,
            in_memory=scoring.in_memory, out_dtype=out_dtype, diversity=scoring.diversity, copy=averaging.copy)
        listeners = Broadcast(events, scoring_listeners)
    written = execute_run(source, plan, force=averaging.force, keep_downloads=averaging.keep_downloads,
                          device=averaging.device, out_dtype=out_dtype, copy=averaging.copy,
                          output_format=averaging.output_format, events=listeners, in_memory=in_memory)
    if scorer is not None and not scoring.in_memory:  # the averages, and originals not scored on the way
        from .evaluation.scorer import run_eval
        from .evaluation.targets import find_targets

        for root in plan.roots.values():
            steps = {j.window.step for j in plan.jobs if j.out_dir.parent == root}
            run_eval(find_targets(root, steps, scoring.originals), scorer)
    return TrajectoryRun(plan, tuple(duplicates), tuple(written), scorer.scored if scorer else 0,
                         scorer.failed if scorer else 0)


@contextmanager
def _tracked(scoring: Scoring | None, events: Events) -> Iterator[tuple[Scoring | None, Events]]:
    """With trackers asked for: the scoring without them and the events with their listener (one
    opened for the whole of a run: a follower's rounds share it)."""
    if scoring is None or not scoring.tracking:
        yield scoring, events
        return
    from .report.tracking import logging_scores

    with logging_scores(scoring.tracking, scoring.results) as listener:
        yield replace(scoring, tracking=None), Broadcast(events, listener)


def _scorer(scoring: Scoring, store, device: str, force: bool, events: Events):
    from .evaluation.scorer import Scorer

    return Scorer(scoring.tasks, store, scoring.registered().manager, device=device, dtype=scoring.dtype,
                  batch_size=scoring.batch_size, limit=scoring.limit, force=force, events=events,
                  resident=not scoring.fresh_model)


# -- scoring a folder of outputs --------------------------------------------------------------------
@dataclass(frozen=True)
class EvalRun:
    targets: tuple
    scored: int = 0
    failed: int = 0


def find_targets(root: str | Path, steps: set[int] | None = None, originals: bool = True) -> list:
    from .evaluation.targets import find_targets as find

    return find(Path(root), steps, originals)


def fetch_summary(targets: Sequence) -> tuple[int, int, int, int]:
    """(averaged outputs, runs they belong to, originals to fetch from the Hub, bytes to fetch)."""
    from .evaluation.targets import fetch_bytes
    from .report.store import ORIGINAL

    averaged = [t for t in targets if t.tag != ORIGINAL]
    return (len(averaged), len({(t.model, t.tag) for t in averaged}), sum(1 for t in targets if t.repo),
            fetch_bytes(targets))


def evaluate(root: str | Path, scoring: Scoring, *, steps: set[int] | None = None, force: bool = False,
             events: Events = QUIET, targets: Sequence | None = None) -> EvalRun:
    """Score every finished output at any depth under `root` (and the originals of their steps) into
    `scoring.results`; what the store has is skipped unless `force`. `targets`, when a caller has found
    them already (`find_targets`), saves walking the outputs and reading their manifests again."""
    from .evaluation.scorer import run_eval
    from .report.store import Store

    targets = list(targets) if targets is not None else find_targets(root, steps, scoring.originals)
    device = resolve_device(scoring.device)
    with Store(scoring.results) as store, _tracked(scoring, events) as (scoring, events):
        scorer = _scorer(scoring, store, device, force, events)
        run_eval(targets, scorer)
    return EvalRun(tuple(targets), scorer.scored, scorer.failed)


def export_scores(results: str | Path, tracking: Tracking, *, force: bool = False) -> int:
    """Log a results store's scores to trackers (`ckptavg results --export`): those each tracker has not had
    yet, or with `force` every one. Returns the points logged, all trackers together."""
    from .report.store import open_results
    from .report.tracking import export, opened

    tracking = tracking.checked()
    with open_results(Path(results)) as store, opened(tracking) as trackers:
        return export(store, trackers, force=force)


# -- checkpoint diversity ---------------------------------------------------------------------------
def diversity(a: str | Path, b: str | Path, text: str | Path, *, device: str = "auto", dtype: str = "auto",
              results: str | Path | None = None, model: str | None = None, step: int | None = None,
              tag: str = "pair", context: int | None = None):
    """How much checkpoints A and B disagree on `text` (`evaluation.diversity.Diversity`): argmax
    disagreement and mean KL(A || B). With `results`, stored as task `diversity:TEXT-NAME` of the run
    `model`/`tag` at `step` (by default B's trajectory and step, from its manifest or its folder's
    name), so that `plot` draws it against step."""
    from .evaluation.diversity import TASK_PREFIX, measure, read_texts
    from .evaluation.resident import identity

    a, b = Path(a), Path(b)
    for folder in (a, b):
        if not (folder / "config.json").is_file():
            raise OptionError(f"{folder}: not a model folder (no config.json)")
    texts = read_texts(Path(text))
    dtype = opt.choice(dtype, opt.EVAL_DTYPES, "--dtype")
    model, step = _trajectory_step(b, model, step) if results is not None else (model or "", step or 0)
    if identity(a) != identity(b):
        raise OptionError(f"{a} and {b} differ in config or tokenizer: their predictions are not comparable")
    from .evaluation.harness import effective_settings, load_model

    dev = resolve_device(device)
    lm_a, lm_b = (load_model(folder, dev, dtype, "1") for folder in (a, b))  # as a fresh model is loaded to score
    found = measure(lm_a.model, lm_b.model, lm_b.tokenizer, texts, context)
    if results is not None:
        _store_diversity(results, model, tag, step, f"{TASK_PREFIX}{Path(text).stem}", found,
                         f"{a} vs {b}", effective_settings(dev, dtype, "1")[1], dev)
    return found


def _trajectory_step(folder: Path, model: str | None, step: int | None) -> tuple[str, int]:
    """(trajectory, step) of a checkpoint: given, or from its manifest's run, or its folder's names."""
    from .trajectory.sources import step_branches

    manifest = read_manifest(folder) if is_finished(folder) else None
    model = model or (manifest.run.model if manifest and manifest.run else folder.parent.name)
    if step is None:
        found = step_branches([folder.name], DEFAULT_STEP_PATTERN, str(folder))
        if not found:
            raise OptionError(f"{folder}: no step in its name; give --step")
        step = next(iter(found))
    return model, step


def _store_diversity(results, model: str, tag: str, step: int, task: str, found, where: str, dtype: str,
                     device: str) -> None:
    from .evaluation.diversity import rows
    from .report.store import Store

    with Store(Path(results)) as store:
        store.put(rows(found, model, tag, step, task, where, dtype, device))


# -- interpolation ----------------------------------------------------------------------------------
def interpolate(a: str | Path, b: str | Path, alphas: Sequence[float], out: str | Path, *, device: str = "auto",
                dtype: str = "auto", copy: Sequence[str] = (), force: bool = False, output_format: str = "auto",
                progress: Callable[[float], Callable | None] | None = None
                ) -> list[tuple[float, Path | RemotePath, bool]]:
    """alpha*A + (1-alpha)*B for each alpha into OUT/alphaA/; finished ones are skipped unless `force`.
    Returns (alpha, folder, written) per alpha. `progress(alpha)` gives `average_checkpoints`' hook."""
    from .engine.average import average_checkpoints
    from .layout import interpolation_folder

    if not alphas:
        raise OptionError("--alphas is empty")
    out_dtype = torch_dtype(opt.choice(dtype, opt.AVERAGE_DTYPES, "--dtype"))
    patterns, dev = opt.copy_patterns(copy), resolve_device(device)
    output_format = opt.choice(output_format, opt.OUTPUT_FORMATS, "--output-format")
    done = []
    for alpha in alphas:
        target = interpolation_folder(out, alpha)
        if not force and is_finished(target):
            done.append((alpha, target, False))
            continue
        average_checkpoints([a, b], target, weights=[alpha, 1 - alpha], normalize=False, force=force, device=dev,
                            out_dtype=out_dtype, copy=patterns, output_format=output_format,
                            progress=progress(alpha) if progress else None,
                            method=Method("interpolate", params={"alpha": alpha, "a": str(a), "b": str(b)}))
        done.append((alpha, target, True))
    return done


def output_summary(folder: str | Path) -> tuple[int, float]:
    """(tensor bytes, seconds) of a finished output, from its manifest."""
    manifest = read_manifest(folder)
    return (manifest.output.tensor_bytes, manifest.seconds) if manifest else (0, 0.0)


# -- savings ----------------------------------------------------------------------------------------
def savings_table(store: str | Path, models: Sequence[str], task: str, *, metric: str | None = None,
                  tag: str | None = None, tolerances: Sequence[float] = (0, 0.5, 1, 2, 5),
                  total_steps: int | None = None, gpu_hours: float | None = None,
                  usd_per_gpu_hour: float | None = None) -> tuple[str, list[dict]]:
    """(metric, one record per model and tolerance): GPU hours saved by the averaged run `tag` of each
    model (a stored name, or a Pythia size such as 6.9b) on `task`."""
    from .report.savings import catalogue_gpu_hours, match_model, savings
    from .report.store import ORIGINAL, open_results
    from .report.tables import primary_metric
    from .trajectory.pythia import TOTAL_STEPS

    if not tolerances:
        raise OptionError("--tolerance is empty")
    with open_results(store) as db:
        rows = db.rows(task=task)
    if not rows:
        raise SavingsError(f"{store}: no results for task {task!r}")
    chosen = metric or primary_metric(r.metric for r in rows)
    rows = [r for r in rows if r.metric == chosen]
    if not rows:
        raise SavingsError(f"{store}: no {chosen!r} results for task {task!r}")
    stored = sorted({r.model for r in rows})
    table = []
    for name in models:
        m = match_model(name, stored)
        mine = [r for r in rows if r.model == m]
        tags = sorted({r.tag for r in mine if r.tag != ORIGINAL})
        run = tag or (tags[0] if len(tags) == 1 else None)
        if run is None or run not in tags:
            raise SavingsError(f"{m}: choose the averaging run with --tag ({', '.join(tags) or 'none stored'})")
        hours = gpu_hours or catalogue_gpu_hours(m)
        if hours is None:
            raise SavingsError(f"{m}: no published GPU hours; give --gpu-hours")
        used = [r for r in mine if r.tag in (ORIGINAL, run)]
        settings = sorted({r.settings for r in used})
        if len(settings) > 1:  # lm-eval's numbers move with the batch size (lm-eval #704): unlike scores
            shown = " and ".join(f"batch {b or '?'}, {d or '?'}, {v or '?'}" for b, d, v in settings)
            raise SavingsError(f"{m}: the original and {run} on {task} were scored with different settings ({shown}); "
                               f"score them again alike (`ckptavg eval --force` with one --batch-size, --dtype and "
                               f"--device) before comparing")
        better = next((r.higher_is_better for r in mine if r.higher_is_better is not None), False)
        original_curve = [(r.step, r.value) for r in mine if r.tag == ORIGINAL]
        averaged_curve = [(r.step, r.value) for r in mine if r.tag == run]
        for s in savings(original_curve, averaged_curve, tolerances, total_steps=total_steps or TOTAL_STEPS,
                         gpu_hours=hours, higher_is_better=better, usd_per_gpu_hour=usd_per_gpu_hour):
            table.append({"model": m, "tag": run, "task": task, "metric": chosen, "tolerance_pct": s.tolerance,
                          "target": s.target, "step_reached": s.step, "original_reached": s.original_step,
                          "steps_ahead": s.steps_ahead, "gpu_hours_ahead": s.gpu_hours_ahead,
                          "steps_saved": s.steps_saved,
                          "pct_of_training": None if s.fraction is None else 100 * s.fraction,
                          "gpu_hours_saved": s.gpu_hours} | ({"usd_saved": s.usd} if usd_per_gpu_hour else {}))
    return chosen, table


# -- results and figures ----------------------------------------------------------------------------
def result_rows(store: str | Path, *, model: str | None = None, task: str | None = None, metric: str | None = None,
                failed: bool = False) -> list:
    """Stored rows (`report.store.Row`): successful scores, or with `failed` the failed checkpoint x task pairs."""
    from .report.store import open_results

    with open_results(store) as db:
        rows = db.rows(model=model, task=task, status="failed" if failed else "ok")
    return [r for r in rows if r.metric == metric] if metric and not failed else rows


def plot(store: str | Path, task: str, out: str | Path, *, metric: str | None = None, model: str | None = None,
         compare: Sequence[str] = (), original: bool = True, title: str | None = None) -> Path:
    """A metric against training step: the original trajectory and the averaged runs (`compare`: only these
    methods or run tags)."""
    from .errors import InputError
    from .report.plots import plot_trajectories
    from .report.store import ORIGINAL
    from .report.tables import primary_metric

    opt.image_file(Path(out), "--out")
    rows = result_rows(store, model=model, task=task)
    if not rows:
        raise InputError(f"{store}: no results for task {task!r}" + (f" and model {model!r}" if model else ""))
    chosen = metric or primary_metric(r.metric for r in rows)
    if compare:
        rows = [r for r in rows if r.tag == ORIGINAL or r.method in compare or r.tag in compare]
    if not original:
        rows = [r for r in rows if r.tag != ORIGINAL]
    return plot_trajectories(rows, task, chosen, Path(out), title)
