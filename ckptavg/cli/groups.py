"""The option groups, each declared once and added to the commands that take it (`grouped`): the schedule,
the arithmetic, downloads, following a run, scoring and its trackers."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from ..engine.ranks import TIMEOUT_S, Ranks, from_environment
from ..trajectory import methods
from .console import fail, say


def grouped(**groups: type) -> Callable[[Callable], Callable]:
    """Add the options of each group (a dataclass whose defaults are typer options) to a command, which
    then receives one object per group under the given name: options are declared once, in one place,
    and a command's own signature lists only what is its own."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in groups]
        added = []
        for cls in groups.values():
            hints = typing.get_type_hints(cls)
            added += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=hints[f.name]) for f in dataclasses.fields(cls)]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            for name, cls in groups.items():
                kwargs[name] = cls(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls)})
            return fn(*args, **kwargs)

        command.__signature__ = signature.replace(parameters=own + added)
        command.__annotations__ = {p.name: p.annotation for p in own + added}
        return command

    return decorate


# -- the option groups ------------------------------------------------------------------------------
SCORING = "Scoring"
TRACKING = "Trackers (scores logged as they are stored)"


@dataclass
class Schedule:
    """Which windows: the method and its spacing (start and end are each command's own)."""

    k: int = typer.Option(5, "--k", help="Checkpoints per LAWA window (EMA and SWA use the same checkpoint "
                          "sequence).")
    nu: int = typer.Option(1000, "--nu", help="Steps between the checkpoints of one window.")
    interval: int = typer.Option(3000, "--interval", help="Steps between consecutive outputs.")
    method: str = typer.Option("lawa", help=methods.help_text() + ".")
    ema_alpha: float = typer.Option(methods.DEFAULT_EMA_ALPHA, help="ema: e_i = (1-alpha) e_(i-1) + alpha c_i "
                                    "over the whole checkpoint sequence; ema-window: the same inside each window "
                                    "of k.")
    decay_shape: str = typer.Option(methods.DEFAULT_DECAY_SHAPE, help="decay: the shape f with f(0) = 1, "
                                    "f(1) = 0: linear (1 - x), cosine ((1 + cos(pi x)) / 2) or 1-sqrt "
                                    "(1 - sqrt(x)).")
    nu_tokens: Optional[str] = typer.Option(None, help="--nu in tokens (e.g. 4B, 500M), instead of steps; it must "
                                            "be a whole number of steps.")
    interval_tokens: Optional[str] = typer.Option(None, help="--interval in tokens (e.g. 6.3B).")
    tokens_per_step: Optional[int] = typer.Option(None, help="Tokens per training step, for --nu-tokens and "
                                                  "--interval-tokens and to show tokens in the plan and manifests "
                                                  "(`pythia`: 2097152, from the catalogue).")
    swa_start: Optional[int] = typer.Option(None, help="SWA: first step of the running mean (default: the first "
                                            "checkpoint of the sequence).")


@dataclass
class Arithmetic:
    """Where and in what precision averaged tensors are computed and stored, and what is never averaged."""

    device: str = typer.Option("auto", help="Where to do the arithmetic: auto (cuda if available), cpu, cuda or "
                               "cuda:N.")
    dtype: str = typer.Option("auto", help="Output dtype of averaged tensors: auto (as stored in the newest input), "
                              "float16, bfloat16, float32 or float64.")
    copy: list[str] = typer.Option([], "--copy", help="Also copy tensors whose names match this fnmatch pattern "
                                    "from the newest input instead of averaging them (your architecture's "
                                    "non-trained buffers, e.g. '*.attn.masked_bias'); like Pythia's buffers, they "
                                    "may be absent from older inputs. Repeatable.")
    output_format: str = typer.Option("auto", help="Output format: auto (the inputs' own: a DCP checkpoint for DCP "
                                      "inputs, which torch.distributed.checkpoint and the trainers load; the "
                                      "trainer's own file for Lightning .ckpt, nanoGPT ckpt.pt and DeepSpeed "
                                      "inputs, optimizer state left out; safetensors for the rest), "
                                      "safetensors (a Hugging Face model folder), dcp or torch.")


@dataclass
class Launch:
    """How a command launched on several ranks (torchrun, srun) shares its averages."""

    timeout: float = typer.Option(TIMEOUT_S, help="Launched on several ranks (torchrun --nproc-per-node N, srun -n N: "
                                  "they share each average, rank 0 commits it): seconds a rank may be silent (killed, "
                                  "its node lost) before the others stop; a rank busy with a long share is never "
                                  "silent.")

    def ranks(self) -> Ranks | None:
        """This process's place among the ranks of a torchrun or srun launch (None: it runs alone)."""
        if not self.timeout > 0:
            raise fail(f"--timeout must be a positive number of seconds, not {self.timeout:g}")
        return from_environment()


SLURM = "Slurm (--executor slurm)"


@dataclass
class Submit:
    """Where one average runs: here (alone, or as the ranks torchrun or srun launched), or as a Slurm job."""

    executor: str = typer.Option("local", help="local (this process, or the ranks torchrun or srun launched) or "
                                 "slurm (one job of --nodes x --tasks-per-node ranks, submitted from here through "
                                 "submitit and waited for; SLURM_CONF and the Slurm commands as this shell has "
                                 "them; inputs and output on a filesystem the nodes share).")
    nodes: int = typer.Option(1, help="Nodes of the job.", rich_help_panel=SLURM)
    tasks_per_node: int = typer.Option(8, help="Ranks on each node.", rich_help_panel=SLURM)
    cpus_per_task: int = typer.Option(2, help="CPUs of each rank.", rich_help_panel=SLURM)
    partition: Optional[str] = typer.Option(None, help="Slurm partition.", rich_help_panel=SLURM)
    time_min: int = typer.Option(240, help="Time limit, in minutes.", rich_help_panel=SLURM)
    mem: Optional[str] = typer.Option(None, help="Memory per node, as sbatch takes it (e.g. 64G).",
                                      rich_help_panel=SLURM)
    sbatch: list[str] = typer.Option([], help="Another sbatch option, KEY=VALUE (e.g. account=proj). Repeatable.",
                                     rich_help_panel=SLURM)

    def job(self, ranks: Ranks | None):
        """The Slurm job asked for (`api.cluster.SlurmJob`, checked), or None to run here (as one of `ranks`)."""
        if self.executor not in ("local", "slurm"):
            raise fail(f"--executor: unknown value {self.executor!r} (choose from local, slurm)")
        if self.executor == "local":
            return None
        if ranks is not None:
            raise fail("--executor slurm submits the ranks: run it once, from a login node, not under torchrun "
                       "or srun")
        from ..api.cluster import SlurmJob

        return SlurmJob(self.nodes, self.tasks_per_node, self.cpus_per_task, self.partition, self.time_min, self.mem,
                        tuple(self.sbatch)).checked()

    def submitted(self, ranks) -> bool:
        """With --executor slurm: this command line (less the job's options) run as a Slurm job of ranks, waited
        for, and what its rank 0 printed printed here; True. False: run it here."""
        job = self.job(ranks)
        if job is None:
            return False
        import sys

        from ..api.cluster import submit_command, without_job_options

        args = without_job_options(sys.argv[1:])
        say(f"submitting `ckptavg {args[0]}` as a Slurm job of {job.nodes} x {job.tasks_per_node} ranks")
        printed, job_id = submit_command(args, job, Path.cwd() / ".ckptavg-slurm")
        if printed:
            say(printed, markup=False)
        say(f"(Slurm job {job_id}, {job.nodes * job.tasks_per_node} ranks)")
        return True


@dataclass
class Downloads:
    """Where Hub revisions go and whether they stay."""

    cache_dir: Optional[Path] = typer.Option(None, help="Hugging Face cache folder for downloads (default: "
                                             "HF_HUB_CACHE, ~/.cache/huggingface/hub).")
    keep_downloads: bool = typer.Option(False, help="Keep every downloaded revision instead of deleting each one "
                                        "after its last window (only revisions ckptavg downloaded are ever "
                                        "deleted).")


FOLLOW = "Following a run as it trains (--follow)"


@dataclass
class Follow:
    """Following a run while it trains."""

    follow: bool = typer.Option(False, "--follow", help="Keep watching the local run folder(s) as the trainer "
                                "writes them: average (and score) each window once its newest checkpoint is "
                                "complete, keeping (hard links, in OUT/NAME/.ckptavg-kept/) the checkpoints a later "
                                "window needs from the trainer's deletions. Stops at --until, after "
                                "--idle-timeout, or on Ctrl-C/SIGTERM; a rerun goes on where it stopped.",
                                rich_help_panel=FOLLOW)
    until: Optional[int] = typer.Option(None, help="With --follow: stop once every window up to this output "
                                        "step is done.", rich_help_panel=FOLLOW)
    idle_timeout: Optional[str] = typer.Option(None, help="With --follow: stop after this long without a new "
                                               "complete checkpoint (90s, 30m, 2h).", rich_help_panel=FOLLOW)
    poll: str = typer.Option("30s", help="With --follow: the longest pause between scans of the run folder(s) "
                             "(they start at 1 s and double while nothing changes).", rich_help_panel=FOLLOW)

    def options(self):
        """The checked `FollowOptions`; --until and --idle-timeout without --follow are errors."""
        from .. import options as opt
        from ..trajectory.follow import FollowOptions

        if not self.follow:
            if self.until is not None or self.idle_timeout is not None:
                raise fail("--until and --idle-timeout go with --follow")
            return None
        return FollowOptions(self.until, opt.duration(self.idle_timeout, "--idle-timeout")
                             if self.idle_timeout else None, opt.duration(self.poll, "--poll"))


@dataclass
class Tasks:
    """What scoring runs with: task files, the store, and lm-eval's settings."""

    pile: Optional[Path] = typer.Option(None, help="A Pile-format file (.jsonl, .jsonl.zst or .jsonl.gz; records "
                                        '{"text", "meta": {"pile_set_name"}}, like the Pile\'s val/test files) for '
                                        "the pile-* tasks.", rich_help_panel=SCORING)
    ppl_task: list[str] = typer.Option([], "--ppl-task", help="NAME=FILE.jsonl: a perplexity task over your own "
                                       '{"text": ...} records (word and byte perplexity, bits per byte). '
                                       "Repeatable.", rich_help_panel=SCORING)
    include_path: list[Path] = typer.Option([], help="A folder of lm-eval task YAMLs to register. Repeatable.",
                                            rich_help_panel=SCORING)
    results: Path = typer.Option(Path("results.sqlite"), help="SQLite results store (created if missing).",
                                 rich_help_panel=SCORING)
    limit: Optional[int] = typer.Option(None, help="At most N documents per task (for quick looks; stored apart "
                                        "from full scores).", rich_help_panel=SCORING)
    batch_size: str = typer.Option("auto", help="lm-eval batch size: auto (8 on CPU) or N.", rich_help_panel=SCORING)
    fresh_model: bool = typer.Option(False, "--fresh-model", help="Build a new model for every checkpoint instead "
                                     "of loading each one's weights into one resident model (the scores are the "
                                     "same; the resident model saves a build per checkpoint, which counts for large "
                                     "models on a GPU).", rich_help_panel=SCORING)
    tensorboard: Optional[Path] = typer.Option(None, help="Also log each score as it is stored to TensorBoard event "
                                               "files under this folder (one run per trajectory; series "
                                               "eval/RUN-TAG/TASK/METRIC by step). Needs ckptavg[tensorboard].",
                                               rich_help_panel=TRACKING)
    mlflow: Optional[str] = typer.Option(None, help="Also log each score to MLflow at this tracking URI (one run "
                                         "per trajectory in experiment $MLFLOW_EXPERIMENT_NAME, else ckptavg). Needs "
                                         "ckptavg[mlflow].", rich_help_panel=TRACKING)
    wandb: Optional[str] = typer.Option(None, help="Also log each score to this Weights & Biases project (one run "
                                        "per trajectory; $WANDB_MODE=offline writes run files to sync later). Needs "
                                        "ckptavg[wandb].", rich_help_panel=TRACKING)


@dataclass
class Study:
    """Scoring as a trajectory run goes."""

    study_tasks: Optional[str] = typer.Option(None, "--eval", help="Also score with these lm-eval tasks "
                                              "(comma-separated, as in `ckptavg eval`) into --results: each original "
                                              "while it is on disk for averaging, each average once made, so a whole "
                                              "study fetches every revision once.", rich_help_panel=SCORING)
    originals: bool = typer.Option(True, "--originals/--no-originals", help="With --eval: also score the original "
                                   "checkpoint at each output step.", rich_help_panel=SCORING)
    in_memory: bool = typer.Option(False, "--in-memory", help="With --eval: average in memory and score, writing no "
                                   "model folders, only results.", rich_help_panel=SCORING)
    diversity: Optional[Path] = typer.Option(None, "--diversity", help="With --eval: also store how much each two "
                                             "consecutive window members disagree on this text (as `ckptavg "
                                             "diversity`: task diversity:TEXT-NAME, series nuN).",
                                             rich_help_panel=SCORING)


def scoring(tasks: Optional[str], t: Tasks, *, originals: bool, in_memory: bool, register: bool, device: str = "auto",
            dtype: str = "auto", diversity: Optional[Path] = None):
    """The checked scoring settings of a command (None when it scores nothing)."""
    from ..api import scoring as checked

    if in_memory and not tasks:
        raise fail("--in-memory needs --eval TASKS: without scoring there is nothing to keep")
    if diversity is not None and not tasks:
        raise fail("--diversity needs --eval TASKS")
    asked = [f"--{k}" for k in ("tensorboard", "mlflow", "wandb") if getattr(t, k) is not None]
    if asked and not tasks:
        raise fail(f"{'/'.join(asked)} log scores: give --eval TASKS")
    if tasks is None:
        return None
    from ..report.tracking import Tracking

    return checked(tasks, t.results, pile=t.pile, ppl_task=t.ppl_task, include_path=t.include_path, limit=t.limit,
                   batch_size=t.batch_size, device=device, dtype=dtype, originals=originals, in_memory=in_memory,
                   fresh_model=t.fresh_model, diversity=diversity, register=register,
                   tracking=Tracking(tensorboard=t.tensorboard, mlflow=t.mlflow, wandb=t.wandb))
