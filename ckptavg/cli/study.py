"""`ckptavg study plan|run|status FILE`: a whole study (sources x a grid of runs x scoring) from one TOML file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from ..units import format_size
from .console import app, compact_table, fail, out, say, user_errors
from .groups import Follow, grouped
from .progress import Bars, Following, following

study_app = typer.Typer(help="A whole study from one TOML file: every source, every run of a grid, scored as it "
                        "goes, each revision fetched once for all the runs that need it.", no_args_is_help=True)
app.add_typer(study_app, name="study")
FILE_ARG = typer.Argument(..., help="The study file (TOML; the format is in the README, under Studies).")
ROOT_OPT = typer.Option(None, "--root", help="Relative paths in the file are relative to this folder (default: the "
                        "current directory).")


@study_app.command("plan")
@user_errors
def plan(file: Path = FILE_ARG, root: Optional[Path] = ROOT_OPT,
         jobs_per_source: int = typer.Option(4, help="Also show the Slurm jobs `study run --executor slurm` would "
                                             "submit with this --jobs-per-source."),
         task_data: bool = typer.Option(False, "--task-data", help="Also say which tasks' data the datasets cache "
                                        "lacks (what `ckptavg tasks fetch` or `study run --executor slurm "
                                        "--fetch-tasks` would fetch); registers the tasks with lm-eval, which takes "
                                        "seconds.")) -> None:
    """The grid, the revisions, the bytes to download and the peak disk of every source; reads no tensor data
    and writes nothing (Pythia sources plan from the built-in catalogue, offline)."""
    from ..study import load_study, plan_study
    from ..study.slurm import SlurmOptions, split

    SlurmOptions(jobs_per_source=jobs_per_source).checked()
    study = load_study(file, root)
    plans = plan_study(study)
    table, short = compact_table(f"{file}: {len(study.grid)} run(s) per source", sources=[p.source for p in plans],
                                 runs=[s.tag() for p in plans for s in p.specs])
    for col in ("source", "runs", "windows", "to do", "revisions", "to download", "peak disk"):
        table.add_column(col, justify="left" if col in ("source", "runs") else "right")
    for p in plans:
        tags = "\n".join(short["runs"](s.tag()) for s in p.specs)
        table.add_row(short["sources"](p.source), tags, str(len(p.plan.jobs)),
                      str(len(p.plan.todo)), str(len(p.plan.fetch.fetches)),
                      format_size(p.plan.fetch.download_bytes), format_size(p.plan.fetch.peak_disk))
    out.print(table)
    total = sum(p.plan.fetch.download_bytes for p in plans)
    peak = max((p.plan.fetch.peak_disk for p in plans), default=0)
    out.print(f"{sum(len(p.plan.todo) for p in plans)} window(s) to average over {len(plans)} source(s), "
              f"{sum(len(p.plan.fetch.fetches) for p in plans)} revision(s) fetched once each, "
              f"{format_size(total)} to download, peak disk {format_size(peak)} (one source at a time)",
              highlight=False, soft_wrap=True)
    for p in plans:
        for dup in p.duplicates:
            say(f"[bold yellow]warning:[/] {dup}")
    if task_data:
        from ..study import uncached_tasks

        missing = ", ".join(f"{d.task} ({d.where})" for d in uncached_tasks(study))
        out.print(f"task data: {'not in the cache: ' + missing if missing else 'every task is local or cached'}",
                  highlight=False, soft_wrap=True)
    groups = [(p.source, g) for p in plans for g in split(p.plan, jobs_per_source)]
    out.print(f"with --executor slurm: {len(groups)} job(s) in one array, each averaging (and scoring) a range of "
              f"consecutive steps of one source:", highlight=False, soft_wrap=True)
    for source, group in groups:
        steps = [j.window.members[-1] for j in group]
        out.print(f"  {source}: {len(group)} window(s), newest checkpoints {min(steps)} to {max(steps)}, "
                  f"{len({m for j in group for m in j.window.members})} revision(s)", highlight=False, soft_wrap=True)


SLURM = "Slurm (--executor slurm)"


@dataclass
class Cluster:
    """Where the study runs, and the Slurm job settings."""

    executor: str = typer.Option("local", help="local (this machine) or slurm (a job array through submitit, "
                                 "SLURM_CONF and the Slurm commands as the submitting shell has them).")
    partition: Optional[str] = typer.Option(None, help="Slurm partition.", rich_help_panel=SLURM)
    jobs_per_source: int = typer.Option(4, help="Array tasks each source's windows are split into (groups of "
                                        "consecutive steps).", rich_help_panel=SLURM)
    cpus_per_job: int = typer.Option(2, help="CPUs per task.", rich_help_panel=SLURM)
    ranks_per_job: int = typer.Option(1, help="Tasks of each job, on one node: the ranks that share each of its "
                                      "averages (its rank 0 scores them).", rich_help_panel=SLURM)
    gpus_per_job: int = typer.Option(0, help="GPUs per task.", rich_help_panel=SLURM)
    mem: Optional[str] = typer.Option(None, help="Memory per task, as sbatch takes it (e.g. 32G).",
                                      rich_help_panel=SLURM)
    time_min: int = typer.Option(240, help="Time limit per task, in minutes.", rich_help_panel=SLURM)
    array_parallelism: int = typer.Option(32, help="Tasks running at once.", rich_help_panel=SLURM)
    sbatch: list[str] = typer.Option([], help="Another sbatch option, KEY=VALUE (e.g. account=proj). Repeatable.",
                                     rich_help_panel=SLURM)
    fetch_tasks: bool = typer.Option(False, "--fetch-tasks", help="Fetch the tasks' data into the Hugging Face "
                                     "cache here, once, before submitting, so that compute nodes without a network "
                                     "can score: the jobs then run with HF_DATASETS_OFFLINE=1 (and HF_HUB_OFFLINE=1 "
                                     "when no source is on the Hub).", rich_help_panel=SLURM)


@study_app.command("run")
@user_errors
@grouped(cluster=Cluster, watching=Follow)
def run(file: Path = FILE_ARG, root: Optional[Path] = ROOT_OPT,
        force: bool = typer.Option(False, "--force", help="Redo outputs (and scores) that are already finished."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."), cluster: Cluster = None,
        watching: Follow = None) -> None:
    """Run the study: each revision fetched once for every run of the grid that needs it. Everything is checked
    before the first download; finished outputs and stored scores are skipped, so running it again after an
    interruption (or a failed cluster job) does only what is missing. With --follow, keeps going while the
    study's local sources train."""
    from ..study import follow_study, load_study, run_study, submit_study
    from ..study.slurm import SlurmOptions

    study = load_study(file, root)
    if cluster.executor not in ("local", "slurm"):
        raise fail(f"--executor: unknown value {cluster.executor!r} (choose from local, slurm)")
    options = watching.options()
    if options is not None:
        if cluster.executor != "local":
            raise fail("--follow runs on this machine (--executor local): a follower waits beside the trainer")
        say(f"following {', '.join(e.name for e in study.sources)} ({len(study.grid)} run(s) each)")
        return following(lambda events: follow_study(study, options, force=force, events=events), study.out,
                         Following(quiet), scores=bool(study.scoring.get("tasks")))
    if cluster.executor == "slurm":
        totals = submit_study(study, SlurmOptions(cluster.partition, cluster.jobs_per_source, cluster.cpus_per_job,
                                                  cluster.gpus_per_job, cluster.mem, cluster.time_min,
                                                  cluster.array_parallelism, tuple(cluster.sbatch),
                                                  cluster.fetch_tasks, cluster.ranks_per_job))
        say(f"{totals['written']} output(s) written under {study.out} by Slurm jobs"
            + (f"; {totals['scored']} task score(s) merged into {study.results}, {totals['failed']} failed"
               if study.scoring.get("tasks") else ""))
        return
    with Bars(quiet) as bars:
        runs = run_study(study, force=force, events=bars.count_scores(None) if study.scoring.get("tasks") else bars)
    say(f"{sum(len(r.written) for r in runs)} output(s) written under {study.out}"
        + (f"; {sum(r.scored for r in runs)} task score(s) written to {study.results}, "
           f"{sum(r.failed for r in runs)} failed" if study.scoring.get("tasks") else ""))


@study_app.command("status")
@user_errors
def status(file: Path = FILE_ARG, root: Optional[Path] = ROOT_OPT) -> None:
    """Per source and run: windows, finished outputs, pending, and scored windows; and the last Slurm
    submission's jobs with their states and logs."""
    from rich.table import Table

    from ..study import load_study, study_status
    from ..study.slurm import job_status

    study = load_study(file, root)
    rows = study_status(study)
    table, short = compact_table(f"{file}", sources=[r.source for r in rows], runs=[r.run for r in rows])
    for col in ("source", "run", "windows", "finished", "pending", "scored"):
        table.add_column(col, justify="left" if col in ("source", "run") else "right")
    for r in rows:
        table.add_row(short["sources"](r.source), short["runs"](r.run), str(r.windows), str(r.finished),
                      str(r.pending), "-" if r.scored is None else str(r.scored))
    out.print(table)
    jobs = job_status(study)
    if jobs:
        table = Table(title="the last Slurm submission", title_justify="left")
        for col in ("job", "source", "group", "windows", "state", "log"):
            table.add_column(col, justify="right" if col in ("group", "windows") else "left")
        for j in jobs:
            table.add_row(j.job, j.source, str(j.group), str(j.windows), j.state, j.log)
        out.print(table)
