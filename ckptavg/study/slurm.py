"""A study on a Slurm cluster, through submitit: one array task per group of consecutive windows.

Each source's windows (ordered by their newest checkpoint, as on one machine) are cut into groups of
consecutive steps, so that a node downloads the revisions of its group once and makes every average
and score that needs them. Groups are cut only between different newest checkpoints. Each task has a
Hugging Face cache of its own (a revision two neighbouring groups need is fetched by both, and no task
ever evicts what another is reading) and a results store of its own, merged into the study's store
when the array is done (SQLite's WAL mode needs every writer on one host). Finished outputs and stored
scores are skipped, so a re-submission after a failed or cancelled task does only what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..api.cluster import check_job_options, sbatch_options, submitting
from ..atomic import write_text
from ..errors import JobsFailedError, OptionError
from ..trajectory.run import Job, RunPlan


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    jobs_per_source: int = 4  # array tasks a source's windows are split into (fewer if it has fewer windows)
    cpus_per_job: int = 2
    gpus_per_job: int = 0
    mem: str | None = None  # e.g. "32G", as sbatch takes it
    time_min: int = 240
    array_parallelism: int = 32  # array tasks running at once
    sbatch: tuple[str, ...] = ()  # extra sbatch options, KEY=VALUE (e.g. account=proj, qos=high)
    fetch_tasks: bool = False  # fetch the tasks' data here first, so that the jobs score offline
    ranks_per_job: int = 1  # tasks of each job, on one node: the ranks that share each of its averages

    def checked(self) -> SlurmOptions:
        check_job_options(self, ("jobs_per_source", "cpus_per_job", "time_min", "array_parallelism",
                                 "ranks_per_job"))
        if self.gpus_per_job < 0:
            raise OptionError("--gpus-per-job must not be negative")
        return self


@dataclass(frozen=True)
class Share:
    """One array task's part of a study: which source, which windows."""

    source: int  # index into the study's sources
    group: int
    windows: tuple[tuple[str, int], ...]  # (run tag, output step)


def split(plan: RunPlan, groups: int, needed=None) -> list[list[Job]]:
    """Consecutive windows in about equal groups, cut only where the newest checkpoint changes. `needed(job)`
    picks the windows with work left (default: those without a finished output)."""
    todo = sorted((j for j in plan.jobs if needed(j)), key=lambda j: (j.window.members[-1], j.window.step)) \
        if needed is not None else list(plan.todo)
    if not todo:
        return []
    size = -(-len(todo) // max(1, min(groups, len(todo))))
    out: list[list[Job]] = [[]]
    for job in todo:
        current = out[-1]
        if len(current) >= size and current[-1].window.members[-1] != job.window.members[-1]:
            out.append([])
        out[-1].append(job)
    return out


def state_folder(study) -> Path:
    """Where the array's logs, task stores and caches go: beside the outputs, hidden."""
    return Path(study.out) / f".study-{Path(study.path).stem}"


def run_share(study_path: str, root: str, share: Share, store: str, cache_dir: str) -> dict:
    """What one array task runs (in its own process on a node): its windows of one source."""
    from ..api import run_trajectory
    from ..engine.ranks import from_environment
    from . import _averaging, _open, _scoring, load_study

    s = load_study(study_path, root)
    entry = replace(s.sources[share.source], cache_dir=Path(cache_dir))
    source = _open(entry, offline_catalogue=False)
    wanted = set(share.windows)
    scoring = _scoring(s, register=True)
    # a job of several tasks: its ranks share each average, and its rank 0 scores
    averaging = replace(_averaging(s), ranks=from_environment()).checked()
    run = run_trajectory(source, entry.specs(s.grid, source.steps()), s.out, averaging,
                         # trackers are told by the submitting machine, from the merged store (a node may
                         # be offline, and a job's store keeps no ledger of what went where)
                         replace(scoring, results=Path(store), tracking=None) if scoring else None,
                         select=lambda j: (j.run.tag, j.window.step) in wanted)
    return {"written": len(run.written), "scored": run.scored, "failed": run.failed}


def submit(s, options: SlurmOptions, plans, offline: tuple[str, ...] = ()) -> list:
    """Submit one array of tasks for the study's plans; returns submitit's jobs (with their shares). The
    `offline` variables (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE) are set to 1 in every job."""
    import submitit

    folder = state_folder(s)
    executor = submitit.AutoExecutor(folder=folder / "logs", cluster="slurm")
    extra = sbatch_options(options.sbatch)
    executor.update_parameters(slurm_partition=options.partition, cpus_per_task=options.cpus_per_job,
                               tasks_per_node=options.ranks_per_job,
                               gpus_per_node=options.gpus_per_job or None, timeout_min=options.time_min,
                               slurm_array_parallelism=options.array_parallelism, slurm_job_name=Path(s.path).stem,
                               **({"slurm_mem": options.mem} if options.mem else {}),
                               slurm_additional_parameters=extra,
                               slurm_setup=[f"export {var}=1" for var in offline])
    needed = _work_left(s)
    shares = [Share(i, g, tuple((j.run.tag, j.window.step) for j in group))
              for i, p in enumerate(plans) for g, group in enumerate(split(p.plan, options.jobs_per_source, needed))]
    if not shares:
        return []
    stores = [str(folder / f"results-{sh.source}-{sh.group}.sqlite") for sh in shares]
    caches = [str(folder / f"hf-cache-{sh.source}-{sh.group}") for sh in shares]
    jobs = submitting(executor.map_array, run_share, [str(Path(s.path).absolute())] * len(shares),
                      [str(s.root.absolute())] * len(shares), shares, stores, caches)
    record = [{"job": job.job_id, "source": plans[sh.source].source, "group": sh.group, "windows": len(sh.windows),
               "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr), "store": store}
              for job, sh, store in zip(jobs, shares, stores, strict=True)]
    write_text(folder / "jobs.json", json.dumps(record, indent=2))
    return list(zip(jobs, shares, stores, strict=True))


def _work_left(s):
    """Whether a window still needs a job: no finished output, or (when the study scores) a task of its output
    or of its original not yet in the study's store. A job killed after averaging but before scoring
    leaves the second kind."""
    from ..manifest import is_finished
    from ..report.store import ORIGINAL, open_results

    tasks = list(s.scoring.get("tasks") or [])
    if not tasks:
        return lambda j: not is_finished(j.out_dir)
    limit = s.scoring.get("limit") or 0
    scored: set[tuple] = set()
    if Path(s.results).is_file():
        with open_results(s.results) as store:
            scored = {(r.model, r.tag, r.step, r.task) for r in store.rows(metric=None) if r.limit == limit}
    originals = bool(s.scoring.get("originals", True)) and not s.scoring.get("in_memory", False)

    def needed(j: Job) -> bool:
        tags = [j.run.tag] + ([ORIGINAL] if originals else [])
        return (not is_finished(j.out_dir) and not s.scoring.get("in_memory", False)) or any(
            (j.run.model, tag, j.window.step, t) not in scored for tag in tags for t in tasks)

    return needed


def collect(s, submitted) -> dict:
    """Wait for every task, fold their stores into the study's, and say which failed (with their logs)."""
    from ..report.store import Store

    totals = {"written": 0, "scored": 0, "failed": 0}
    failed = []
    for job, _, store in submitted:
        try:
            result = job.results()[0]  # (rank 0's, for a job of several ranks: it scored)
            for key in totals:
                totals[key] += result[key]
        except Exception as e:  # a task that raised, was cancelled or lost its node
            failed.append(f"job {job.job_id} ({type(e).__name__}; log {job.paths.stderr})")
        if Path(store).is_file():
            with Store(s.results) as main:
                main.merge(Path(store))
    if failed:
        raise JobsFailedError(f"{len(failed)} of {len(submitted)} Slurm job(s) did not finish: {'; '.join(failed)}; "
                           f"what they finished is kept: run the study again to do the rest")
    return totals


@dataclass(frozen=True)
class JobStatus:
    job: str
    source: str
    group: int
    windows: int
    state: str  # Slurm's (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...), or UNKNOWN without Slurm here
    log: str  # the job's stderr


def job_status(s) -> list[JobStatus]:
    """The last submission's jobs (`jobs.json` beside the outputs) and their Slurm states, asked through
    submitit (sacct); UNKNOWN where no Slurm can be asked."""
    record = state_folder(s) / "jobs.json"
    if not record.is_file():
        return []
    jobs = json.loads(record.read_text())
    try:
        from submitit.slurm.slurm import SlurmJob

        states = [SlurmJob(state_folder(s) / "logs", j["job"]).state for j in jobs]
    except Exception:  # no sacct, no Slurm configuration: the record alone is still worth showing
        states = ["UNKNOWN"] * len(jobs)
    return [JobStatus(j["job"], j["source"], j["group"], j["windows"], state, j["stderr"])
            for j, state in zip(jobs, states, strict=True)]
