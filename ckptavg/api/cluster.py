"""A command submitted to Slurm from a login node, through submitit: a job of N nodes x P tasks, every task a
rank (`engine/on_ranks.py`, which finds its rank in the variables srun gives each task), rank 0's answer the
command's. One average by the Python API (`submit_average`); any command line that takes ranks (`ckptavg
trajectory ...`, `ckptavg interpolate ...`) as it was typed, less the job's options (`submit_command`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import JobsFailedError, OptionError, OutputExistsError, SubmitError


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
        check_job_options(self, ("nodes", "tasks_per_node", "cpus_per_task", "time_min"))
        return self


def check_job_options(options, counts: Sequence[str]) -> None:
    """Each of `options`' fields `counts` at least 1, and its `sbatch` flags KEY=VALUE (a job's or a study's)."""
    for name in counts:
        if getattr(options, name) < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be at least 1")
    sbatch_options(options.sbatch)


def sbatch_options(flags: Sequence[str]) -> dict[str, str]:
    """`--sbatch KEY=VALUE` flags as submitit's `slurm_additional_parameters`."""
    for flag in flags:
        if "=" not in flag.lstrip("-"):
            raise OptionError(f"--sbatch takes KEY=VALUE, got {flag!r}")
    return dict(flag.lstrip("-").split("=", 1) for flag in flags)


JOB_OPTIONS = ("--executor", "--nodes", "--tasks-per-node", "--cpus-per-task", "--partition", "--time-min", "--mem",
               "--sbatch")  # (the CLI's `Submit` group: each takes a value)


def without_job_options(argv: Sequence[str]) -> list[str]:
    """A command line less the options that describe the job (`--nodes 2`, `--executor=slurm`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in JOB_OPTIONS:
            skip = True
        elif arg.split("=", 1)[0] not in JOB_OPTIONS:
            out.append(arg)
    return out


def _command_task(args: list[str], cwd: str) -> str:
    """What every task of a command's job runs: `ckptavg ARGS` as its rank; its output, or an error of its
    last line."""
    r = subprocess.run([sys.executable, "-m", "ckptavg", *args], cwd=cwd, capture_output=True, text=True)
    said = (r.stdout + r.stderr).strip()
    if r.returncode != 0:
        raise RuntimeError(next((line for line in reversed(said.splitlines()) if line.startswith("error:")),
                                said.splitlines()[-1] if said else f"exit code {r.returncode}"))
    return said


def _executor(job: SlurmJob, logs: Path, name: str):
    import submitit

    executor = submitit.AutoExecutor(folder=logs, cluster="slurm")
    executor.update_parameters(nodes=job.nodes, tasks_per_node=job.tasks_per_node, cpus_per_task=job.cpus_per_task,
                               timeout_min=job.time_min, slurm_partition=job.partition, slurm_job_name=name,
                               slurm_additional_parameters=sbatch_options(job.sbatch),
                               **({"slurm_mem": job.mem} if job.mem else {}))
    return executor


def submitting(submit, *args):
    """`submit(*args)` (submitit's `submit` or `map_array`), or a `SubmitError` of sbatch's last line."""
    import submitit

    try:
        return submit(*args)
    except (submitit.core.utils.FailedJobError, OSError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise SubmitError(f"Slurm did not take the job: {lines[-1] if lines else type(e).__name__}") from None


def _wait(submitted) -> list:
    """Every task's answer, or one line for a failed job."""
    import submitit

    try:
        return submitted.results()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        said = next((line for line in reversed(str(e).splitlines()) if line.strip().startswith(
            ("ckptavg.", "RankError", "InputError", "OSError", "RuntimeError: error:"))),
            str(e).strip().splitlines()[-1])
        said = said.strip().removeprefix("RuntimeError: ").removeprefix("error: ")
        raise JobsFailedError(f"Slurm job {submitted.job_id} failed: {said} (logs: {submitted.paths.stderr})"
                              ) from None


def submit_command(args: Sequence[str], job: SlurmJob, logs: str | os.PathLike) -> tuple[str, str]:
    """`ckptavg ARGS` (a command that takes ranks) as a Slurm job of `job`'s ranks, run in this folder (a shared
    filesystem); waits for it. Returns (what rank 0 printed, the job's id); its logs go to `logs`."""
    job = job.checked()
    args = list(args)
    submitted = submitting(_executor(job, Path(logs), f"ckptavg-{args[0]}").submit, _command_task, args, os.getcwd())
    return _wait(submitted)[0], submitted.job_id


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
    job = job.checked()
    out = Path(out).absolute()
    if out.exists() and not force:  # (before anything is queued)
        raise OutputExistsError(f"{out} exists (pass --force to replace it)")
    missing = next((p for p in map(Path, inputs) if not p.exists()), None)
    if missing is not None:
        raise OptionError(f"{missing}: no such file or folder (the job's nodes read the inputs from a shared "
                          f"filesystem, by the same path)")
    executor = _executor(job, out.parent / f".{out.name}.ckptavg-slurm", f"ckptavg-{out.name}")
    submitted = submitting(executor.submit, _average_task, [str(Path(p).absolute()) for p in inputs], str(out),
                           dict(options, force=force))
    return Path(_wait(submitted)[0]), submitted.job_id  # (rank 0's: every rank answers the same)
