"""One average submitted to Slurm from a login node, through submitit: a job of N nodes x P tasks, every
task a rank of the average (`engine/on_ranks.py`, which finds its rank in the variables srun gives each task),
rank 0's answer the command's."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import JobsFailedError, OptionError, OutputExistsError


@dataclass(frozen=True)
class SlurmJob:
    nodes: int = 1
    tasks_per_node: int = 8
    cpus_per_task: int = 2
    partition: str | None = None
    time_min: int = 240
    mem: str | None = None  # per node, as sbatch takes it (e.g. "64G")
    sbatch: tuple[str, ...] = ()  # extra sbatch options, KEY=VALUE (e.g. account=proj)

    def checked(self) -> SlurmJob:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be at least 1")
        for flag in self.sbatch:
            if "=" not in flag.lstrip("-"):
                raise OptionError(f"--sbatch takes KEY=VALUE, got {flag!r}")
        return self


def _average_task(inputs: list[str], out: str, options: dict) -> str:
    """What every task of the job runs: its rank of the average."""
    from ..engine.average import average_checkpoints
    from ..engine.ranks import from_environment

    return str(average_checkpoints(inputs, out, ranks=from_environment(), **options))


def submit_average(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, job: SlurmJob, *,
                   force: bool = False, **options) -> tuple[Path, str]:
    """`average_checkpoints(inputs, out, **options)` as a Slurm job of `job.nodes` x `job.tasks_per_node`
    ranks; waits for it. Returns (the output folder, the job's id). The job's logs go beside the output
    (`.OUT.ckptavg-slurm/`); a failed job is one line naming them."""
    import submitit

    job = job.checked()
    out = Path(out).absolute()
    if out.exists() and not force:  # (before anything is queued)
        raise OutputExistsError(f"{out} exists (pass --force to replace it)")
    missing = next((p for p in map(Path, inputs) if not p.exists()), None)
    if missing is not None:
        raise OptionError(f"{missing}: no such file or folder (the job's nodes read the inputs from a shared "
                          f"filesystem, by the same path)")
    executor = submitit.AutoExecutor(folder=out.parent / f".{out.name}.ckptavg-slurm", cluster="slurm")
    executor.update_parameters(nodes=job.nodes, tasks_per_node=job.tasks_per_node, cpus_per_task=job.cpus_per_task,
                               timeout_min=job.time_min, slurm_partition=job.partition,
                               slurm_job_name=f"ckptavg-{out.name}",
                               slurm_additional_parameters=dict(f.lstrip("-").split("=", 1) for f in job.sbatch),
                               **({"slurm_mem": job.mem} if job.mem else {}))
    submitted = executor.submit(_average_task, [str(Path(p).absolute()) for p in inputs], str(out),
                                dict(options, force=force))
    try:
        return Path(submitted.results()[0]), submitted.job_id  # (rank 0's: every rank answers the same)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        said = next((line for line in reversed(str(e).splitlines()) if line.strip().startswith(
            ("ckptavg.", "RankError", "InputError", "OSError"))), str(e).strip().splitlines()[-1])
        raise JobsFailedError(f"Slurm job {submitted.job_id} failed: {said.strip()} (logs: {submitted.paths.stderr})"
                              ) from None
