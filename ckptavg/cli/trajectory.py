"""`ckptavg trajectory` and `ckptavg pythia`: every window of a run, local or from the Hub, scored as it goes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import options as opt
from ..checkpoints.layouts import DEFAULT_STEP_PATTERN
from ..trajectory.events import Broadcast, Events
from ..trajectory.pythia import PAPER_END, PAPER_START
from ..units import format_size, format_tokens
from .console import app, fail, out, say, user_errors
from .groups import Arithmetic, Downloads, Follow, Launch, Schedule, Study, Submit, Tasks, grouped, scoring
from .progress import Bars, Following, following

DRY_HELP = "Print the plan (windows, checkpoints, bytes to download or read, peak disk) and exit; reads no tensor data."


@app.command()
@user_errors
@grouped(schedule=Schedule, arith=Arithmetic, downloads=Downloads, tasks=Tasks, study=Study, watching=Follow,
         launch=Launch, submit=Submit)
def trajectory(
    source: str = typer.Argument(..., help="A local run folder of checkpoints named by step, as a trainer "
                                 "saves them (step1000/, OLMo-core's stepN/model_and_optim/, torchtitan's step-N/, "
                                 "checkpoint-N/, Lightning's epoch=E-step=N.ckpt, iter_NNNNNNN/, global_stepN/), "
                                 "or a Hub model repo id whose branches are steps."),
    steps_from: Optional[str] = typer.Option(None, "--steps-from-branches", "--steps-from",
                                             help="Regular expression matching a branch or folder name in full; "
                                             f"group 1 is its step (default: {DEFAULT_STEP_PATTERN} on the Hub; a "
                                             "local "
                                             "run's trainer layout, recognised from its names)."),
    start: Optional[int] = typer.Option(None, help="First output step (default: the first step with a full window)."),
    end: Optional[int] = typer.Option(None, help="Last output step (default: the last step of the trajectory)."),
    skip_incomplete: bool = typer.Option(False, help="Skip windows whose checkpoints are not all present instead "
                                         "of failing."),
    out_dir: str = typer.Option("out", "--out", "-o", help="Outputs go to OUT/NAME/METHOD-TAG/stepN/ (OUT may be "
                                 "a URL, s3://bucket/tree, for averages without --eval or --follow)."),
    disk_budget: Optional[str] = typer.Option(None, help="Refuse plans whose peak disk use (downloads plus one "
                                              "output) exceeds this, e.g. 200GB."),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    force: bool = typer.Option(False, "--force", help="Redo outputs that are already finished."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No plan table or progress bars."),
    schedule: Schedule = None, arith: Arithmetic = None, downloads: Downloads = None, tasks: Tasks = None,
    study: Study = None, watching: Follow = None, launch: Launch = None, submit: Submit = None,
) -> None:
    """Average a training trajectory window by window (LAWA, WMA, decay, EMA or SWA), local, on a store or on
    the Hub.

    Each Hub revision is downloaded once, by commit id, into the Hugging Face cache and deleted after
    its last window. Finished outputs (with a ckptavg.json) are skipped, so an interrupted run resumes
    where it stopped. --follow keeps going while the run trains. Launched by torchrun or srun, the ranks
    share each window in turn (as `ckptavg average` does, on a shared filesystem; rank 0 scores);
    `--executor slurm` submits that launch as a Slurm job from here and waits for it.
    """
    from ..api import open_trajectory

    schedule = _in_steps(schedule, schedule.tokens_per_step)
    options = watching.options()
    out_dir = opt.output_tree(out_dir, "--out", needs_filesystem="scoring (--eval)" if study.study_tasks else
                              "--follow" if options is not None else None)
    checks = _checked(schedule, arith, downloads, tasks, study, disk_budget, force, dry_run, launch)
    if not dry_run and submit.submitted(checks[0].ranks):
        return
    if options is not None:
        if checks[0].ranks is not None:
            raise fail("--follow runs as one process (launched on several ranks: leave out --follow)")
        return _follow(source, schedule, start, end, options, steps_from, out_dir, checks,
                       cache_dir=downloads.cache_dir, dry_run=dry_run, quiet=quiet)
    bars = Bars(quiet)
    src = open_trajectory(source, steps_from, cache_dir=downloads.cache_dir, bars=bars)
    steps = src.steps()
    first = start if start is not None else steps[0] + (schedule.k - 1) * schedule.nu
    _run(src, _spec(schedule, first, end if end is not None else steps[-1], skip_incomplete), out_dir, *checks,
         dry_run=dry_run, quiet=quiet, bars=bars)


@app.command()
@user_errors
@grouped(schedule=Schedule, arith=Arithmetic, downloads=Downloads, tasks=Tasks, study=Study, launch=Launch)
def pythia(
    model: str = typer.Option(..., "--model", help="Pythia size: 70m, 160m, 410m, 1b, 1.4b, 2.8b, 6.9b or 12b."),
    start: int = typer.Option(PAPER_START, help="First output step."),
    end: int = typer.Option(PAPER_END, help="Last output step."),
    deduped: bool = typer.Option(True, "--deduped/--no-deduped", help="The -deduped repos (default) or the originals."),
    out_dir: str = typer.Option("out", "--out", "-o", help="Outputs go to OUT/pythia-SIZE[-deduped]/METHOD-TAG/"
                                 "stepN/."),
    disk_budget: Optional[str] = typer.Option("200GB", help="Refuse plans whose peak disk use (downloads plus one "
                                              "output) exceeds this."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan from the built-in catalogue (offline, "
                                 "approximate fp16 sizes) and exit."),
    force: bool = typer.Option(False, "--force", help="Redo outputs that are already finished."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No plan table or progress bars."),
    schedule: Schedule = None, arith: Arithmetic = None, downloads: Downloads = None, tasks: Tasks = None,
    study: Study = None, launch: Launch = None,
) -> None:
    """Average EleutherAI Pythia revisions from the Hub (LAWA by default: k=5, nu=1000, every 3000 steps).

    Before any download, the weight hashes of every branch are compared, and revisions that the Hub
    serves byte-identical to another step are listed (this happens on the public repos).
    """
    from ..api import CatalogueTrajectory, pythia_trajectory
    from ..trajectory import pythia as catalogue

    catalogue.model(model)  # an unknown size, before anything else
    schedule = _in_steps(schedule, schedule.tokens_per_step or catalogue.TOKENS_PER_STEP)
    spec = _spec(schedule, start, end, False)
    spec.windows(None)  # the schedule's own checks, before the Hub is asked anything
    out_dir = opt.output_tree(out_dir, "--out", needs_filesystem="scoring (--eval)" if study.study_tasks else None)
    checks = _checked(schedule, arith, downloads, tasks, study, disk_budget, force, dry_run, launch)
    bars = Bars(quiet)
    src = (CatalogueTrajectory(model, deduped) if dry_run else
           pythia_trajectory(model, deduped, cache_dir=downloads.cache_dir, bars=bars))
    _run(src, spec, out_dir, *checks, dry_run=dry_run, quiet=quiet, bars=bars)


def _follow(source: str, schedule: Schedule, start: Optional[int], end: Optional[int], options,
            steps_from: Optional[str], out_dir: Path, checks, *, cache_dir: Optional[Path], dry_run: bool,
            quiet: bool) -> None:
    from ..api import follow_trajectory, open_trajectory
    from ..storage import is_url
    from ..storage.paths import location
    from ..trajectory.follow import complete_steps
    from ..trajectory.hub import HubTrajectory, looks_like_repo_id

    if end is not None:
        raise fail("--follow takes --until instead of --end")
    if dry_run:
        raise fail("--follow takes no --dry-run (it plans as checkpoints land)")
    events = Following(quiet)
    root = location(source)
    if not is_url(source) and not root.exists() and looks_like_repo_id(source):  # a Hub repo, pushed to as it trains
        root = open_trajectory(source, steps_from, cache_dir=cache_dir, bars=events)
    elif not root.is_dir():
        raise fail(f"--follow watches a run folder (local or on an object store) or a Hub repo; {source} is none")
    if start is None:
        steps = root.steps() if isinstance(root, HubTrajectory) else complete_steps(root, steps_from)
        if not steps:
            raise fail(f"{root} has no complete checkpoint yet: give --start, the first output step")
        start = steps[0] + (schedule.k - 1) * schedule.nu
    until = options.until
    spec = _spec(schedule, start, until if until is not None else start, True)
    averaging, checked_scoring = checks
    say(f"following {root} ({spec.tag()}, from step {start}{f' until {until}' if until is not None else ''})")
    following(lambda events: follow_trajectory(root, spec, out_dir, averaging, checked_scoring, options,
                                               pattern=steps_from, events=events),
              out_dir, events, scores=checked_scoring is not None)


def _in_steps(s: Schedule, tokens_per_step: Optional[int]) -> Schedule:
    """The schedule with --nu-tokens and --interval-tokens turned into steps."""
    from dataclasses import replace

    from ..trajectory.schedule import steps_for_tokens

    if tokens_per_step is not None and tokens_per_step < 1:
        raise fail(f"--tokens-per-step must be at least 1, got {tokens_per_step}")
    changes = {}
    for option, value, field in (("--nu-tokens", s.nu_tokens, "nu"), ("--interval-tokens", s.interval_tokens,
                                                                        "interval")):
        if value is None:
            continue
        if tokens_per_step is None:
            raise fail(f"{option} needs --tokens-per-step (`pythia` knows it)")
        changes[field] = steps_for_tokens(opt.tokens(value, option), tokens_per_step, option)
    return replace(s, tokens_per_step=tokens_per_step, **changes)


def _spec(s: Schedule, start: int, end: int, skip_incomplete: bool):
    from ..trajectory.run import RunSpec

    return RunSpec(s.method, s.k, s.nu, s.interval, start, end, s.ema_alpha, s.swa_start, skip_incomplete,
                   s.decay_shape, s.tokens_per_step)


def _checked(schedule: Schedule, arith: Arithmetic, downloads: Downloads, tasks: Tasks, study: Study,
             disk_budget: Optional[str], force: bool, dry_run: bool, launch: Launch):
    """Every option of a run, checked before the trajectory is listed: (averaging, scoring)."""
    from ..api import Averaging
    from ..trajectory.methods import check_parameters

    check_parameters(schedule.method, schedule.k, schedule.nu, schedule.interval, schedule.ema_alpha,
                     schedule.decay_shape)
    averaging = Averaging(arith.device, arith.dtype, disk_budget, tuple(arith.copy), downloads.keep_downloads,
                          force, arith.output_format, launch.ranks(), launch.timeout).checked(dry_run)
    return averaging, scoring(study.study_tasks, tasks, originals=study.originals, in_memory=study.in_memory,
                              diversity=study.diversity, register=not dry_run, device=averaging.device)


def _run(source, spec, out_dir: Path, averaging, checked_scoring, *, dry_run: bool, quiet: bool, bars: Bars) -> None:
    from ..api import run_trajectory

    if averaging.ranks is not None and averaging.ranks.rank:  # (rank 0 speaks for them all)
        quiet, bars = True, Bars(True)

    class Plan(Events):
        def planned(self, plan, duplicates) -> None:
            if dry_run or not quiet:
                print_plan(f"{source.name}: {spec.tag()}", plan, local=source.local)
            if dry_run and source.local:
                say("local checkpoints are compared for duplicates when the run starts: a dry run reads no tensor "
                    "data", style="dim")
            for dup in duplicates:
                say(f"[bold yellow]warning:[/] {dup}: the trajectory serves the same checkpoint under different "
                    f"steps, and these averages will include it as given")

    scores = checked_scoring is not None
    with bars:
        if scores and not dry_run:
            bars.count_scores(2 * len(spec.windows(None)) * len(checked_scoring.tasks))  # at most
        run = run_trajectory(source, spec, out_dir, averaging, checked_scoring, dry_run=dry_run,
                             events=Broadcast(bars, Plan()))
    if dry_run or averaging.ranks is not None and averaging.ranks.rank:
        return
    if scores and checked_scoring.in_memory:
        say(f"{len(run.plan.todo)} window(s) averaged in memory and scored")
    else:
        say(f"{len(run.written)} output(s) written under {out_dir}")
    if scores:
        say(f"{run.scored} task score(s) written to {checked_scoring.results}, {run.failed} failed")


def print_plan(title: str, plan, local: bool) -> None:
    """Windows in order, with what each needs first: checkpoints to download (Hub) or to read (local)."""
    from rich.table import Table

    per_step = plan.jobs[0].spec.tokens_per_step if plan.jobs else None
    columns = ("output step", *(("tokens",) if per_step else ()), "checkpoints",
               *(("new to read", "output") if local else ("to fetch", "disk after")))
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if col != "checkpoints" else "left")
    fetched: list[int] = []
    for a in plan.fetch.actions:
        if a.kind == "fetch":
            fetched.append(a.step)
        elif a.kind == "average":
            w = plan.todo[a.window].window
            members = (", ".join(map(str, w.members)) if len(w.members) <= 5
                       else f"{w.members[0]} ... {w.members[-1]} ({len(w.members)})")
            tokens = (format_tokens(w.step * per_step),) if per_step else ()
            table.add_row(str(w.step), *tokens, members, str(len(fetched)), format_size(a.disk_after))
            fetched = []
    out.print(table)
    done = len(plan.windows) - len(plan.todo)
    if local:
        what = (f"{len(plan.fetch.fetches)} local checkpoint(s) to read ({format_size(plan.read_bytes)}), "
                f"largest output {format_size(plan.fetch.peak_disk)}")
    else:
        what = (f"{len(plan.fetch.fetches)} revision(s) to fetch, {format_size(plan.fetch.download_bytes)} to "
                f"download, peak disk {format_size(plan.fetch.peak_disk)}")
    out.print(f"{len(plan.todo)} window(s) to average ({done} already finished), {what}", highlight=False,
              soft_wrap=True)
