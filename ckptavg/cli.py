"""The `ckptavg` command line: argument parsing and printing only; the work lives in the library."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from . import options as opt
from .errors import CkptavgError, describe_os_error
from .evaluate import DEFAULT_TASKS
from .units import format_size

app = typer.Typer(
    help="Post-hoc checkpoint averaging (LAWA, EMA, SWA) of language-model training trajectories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
# Piped output (logs, files) gets room for the wide tables; a terminal or $COLUMNS decides otherwise.
_WIDTH = None if os.environ.get("COLUMNS") or sys.stdout.isatty() else 120
err = Console(stderr=True, width=_WIDTH)
out = Console(width=_WIDTH)



def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_errors(fn: Callable) -> Callable:
    """Library errors become one line on stderr and exit code 2 (bad input) or 3 (the operating
    system failed mid-run: a full disk, an I/O error, a permission, a vanished file); Ctrl-C 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CkptavgError as e:
            raise _fail(str(e), e.exit_code) from None
        except OSError as e:
            raise _fail(describe_os_error(e), 3) from None
        except KeyboardInterrupt:
            err.print("interrupted: no partial output was left behind")
            raise typer.Exit(130) from None

    return wrapper


def _torch_dtype(name: str):
    """A dtype name already checked by `options.choice`, as torch's (None for auto)."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def _device(name: str) -> str:
    """Checked before any work: the syntax, and that a CUDA device asked for is really there."""
    from .average import resolve_device

    return str(resolve_device(opt.device(name)))


class _Bars:
    """One rich progress display per command; every download and every average gets a bar of bytes."""

    def __init__(self, quiet: bool) -> None:
        self.progress = None
        if not quiet:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True)

    def __enter__(self) -> _Bars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, description: str, total: int) -> Callable[[int], None]:
        bars = self.progress
        if bars is None:
            return lambda n: None
        for task in list(bars.tasks):
            if task.finished:
                bars.remove_task(task.id)
        task_id = bars.add_task(description, total=total)
        return lambda n: bars.advance(task_id, n)

    def for_plan(self, description: str):
        """The progress hook `average_checkpoints` takes: called with the plan, returns the callback."""
        return lambda plan: self(description, plan.output_bytes)


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"ckptavg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                 help="Print the version and exit."),
) -> None:
    """Post-hoc checkpoint averaging (LAWA, EMA, SWA) of language-model training trajectories."""


COPY_OPT = typer.Option([], "--copy", help="Also copy tensors whose names match this fnmatch pattern from the "
                        "newest input instead of averaging them (your architecture's non-trained buffers, e.g. "
                        "'*.attn.masked_bias'); like Pythia's buffers, they may be absent from older inputs. "
                        "Repeatable.")


@app.command()
@user_errors
def average(
    srcs: list[Path] = typer.Argument(..., help="Checkpoint folders (or weight files), oldest first. "
                                      "The last one is the newest: config, tokenizer and every tensor "
                                      "that is not averaged are taken from it."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output Hugging Face model folder."),
    weights: Optional[str] = typer.Option(None, help="Comma-separated weights, one per SRC, in SRC "
                                          "order (default: uniform 1/n)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize",
                                   help="Require the weights to sum to 1; --no-normalize uses them as given."),
    dtype: str = typer.Option("auto", help="Output dtype of averaged tensors: auto (as stored in the "
                              "newest input), float16, bfloat16, float32 or float64."),
    accumulate: str = typer.Option("float32", help="Accumulation precision: float32, or float64 for "
                                   "bit-exact sums of float32 inputs."),
    device: str = typer.Option("auto", help="Where to do the arithmetic: auto (cuda if available), cpu, cuda."),
    shard_size: str = typer.Option("5GB", help="Largest output shard (e.g. 5GB, 500MiB); "
                                   "larger outputs are split, with a model.safetensors.index.json."),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    hash_inputs: bool = typer.Option(True, "--hash/--no-hash", help="Record each input file's sha256 in "
                                     "the manifest (cached per file; free for Hugging Face cache files)."),
    copy: list[str] = COPY_OPT,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Average local checkpoints tensor by tensor into a new model folder.

    Inputs may be model.safetensors, sharded safetensors with an index, pytorch_model.bin, or
    sharded .bin with an index, in any mix. Floats are accumulated in float32 (or float64) and
    cast once; integer and boolean buffers are copied from the newest input. The output is
    written under a temporary name and appears only when complete, with ckptavg.json last.
    """
    from .average import average_checkpoints

    out_dtype = _torch_dtype(opt.choice(dtype, opt.AVERAGE_DTYPES, "--dtype"))
    acc = _torch_dtype(opt.choice(accumulate, opt.ACCUMULATE_DTYPES, "--accumulate"))
    w = opt.floats(weights, "--weights") if weights else None
    shard_bytes = opt.size(shard_size, "--shard-size")
    patterns = opt.copy_patterns(copy)
    dev = _device(device)
    with _Bars(quiet) as bars:
        result = average_checkpoints(srcs, out_dir, weights=w, normalize=normalize, out_dtype=out_dtype,
                                     accumulate=acc, device=dev, shard_bytes=shard_bytes, force=force,
                                     hash_inputs=hash_inputs, copy=patterns, progress=bars.for_plan("averaging"))
    from .writer import read_manifest

    manifest = read_manifest(result) or {}
    size = manifest.get("output", {}).get("tensor_bytes", 0)
    err.print(f"wrote {result} ({format_size(size)}, {len(srcs)} inputs, {manifest.get('seconds', 0):.1f} s)",
              highlight=False)


def _spec(method: str, k: int, nu: int, interval: int, start: int, end: int, ema_alpha: float,
          swa_start: Optional[int], skip_incomplete: bool):
    from .runner import RunSpec

    return RunSpec(method, k, nu, interval, start, end, ema_alpha, swa_start, skip_incomplete)


def _print_plan(title: str, plan, local: bool) -> None:
    """Windows in order, with what each needs first: checkpoints to download (Hub) or to read (local)."""
    from rich.table import Table

    columns = ("output step", "checkpoints", "new to read" if local else "to fetch",
               "output" if local else "disk after")
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if col != "checkpoints" else "left")
    windows = {w.step: w for w in plan.todo}
    fetched: list[int] = []
    for a in plan.fetch.actions:
        if a.kind == "fetch":
            fetched.append(a.step)
        elif a.kind == "average":
            w = windows[a.step]
            members = (", ".join(map(str, w.members)) if len(w.members) <= 5
                       else f"{w.members[0]} ... {w.members[-1]} ({len(w.members)})")
            table.add_row(str(w.step), members, str(len(fetched)), format_size(a.disk_after))
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


@dataclass(frozen=True)
class _Study:
    """The --eval options of a trajectory run, checked: score originals and averages as they are made."""

    tasks: list[str]  # empty: no scoring
    pile: Optional[Path]
    ppl_files: dict[str, Path]
    include_path: list[Path]
    results: Path
    limit: Optional[int]
    batch_size: str
    originals: bool
    in_memory: bool
    manager: object = None  # lm-eval's TaskManager with every task registered; None in a dry run


def _study(tasks: Optional[str], pile: Optional[Path], ppl_task: list[str], include_path: list[Path], results: Path,
           limit: Optional[int], batch_size: str, originals: bool, in_memory: bool, *, register: bool) -> _Study:
    """Every scoring option checked, before any listing, download or write. `register` also registers
    the tasks with lm-eval, which finds unknown task names (a dry run skips it: importing lm-eval
    and indexing its tasks takes seconds)."""
    from .tasks import PILE_SUBSETS

    if in_memory and not tasks:
        raise _fail("--in-memory needs --eval TASKS: without scoring there is nothing to keep")
    task_list = opt.tasks(tasks) if tasks is not None else []
    pile_wanted = [t for t in task_list if t in PILE_SUBSETS]
    if pile_wanted and pile is None:
        raise _fail(f"{', '.join(pile_wanted)} need --pile FILE (a local Pile-format file; the Pile itself can "
                    f"no longer be downloaded), or leave them out of the tasks")
    study = _Study(task_list, opt.existing_file(pile, "--pile"), opt.named_files(ppl_task, "--ppl-task"),
                   opt.existing_dirs(include_path, "--include-path"), results, opt.limit(limit),
                   opt.batch_size(batch_size), originals, in_memory)
    return replace(study, manager=_register_tasks(study)) if register and task_list else study


def _register_tasks(study: _Study):
    """lm-eval's task index with our perplexity tasks (PILE subsets cut from --pile, --ppl-task files) in it."""
    from .evaluate import check_tasks, quiet_lm_eval, task_manager
    from .tasks import PILE_SUBSETS, perplexity_tasks, pile_tasks

    quiet_lm_eval()
    paths = list(study.include_path)
    pile_wanted = [t for t in study.tasks if t in PILE_SUBSETS]
    if pile_wanted:
        paths.append(pile_tasks(study.pile, pile_wanted))
    if study.ppl_files:
        paths.append(perplexity_tasks(study.ppl_files))
    manager = task_manager(paths, study.tasks)
    check_tasks(manager, study.tasks)
    return manager


@dataclass(frozen=True)
class _Averaging:
    """How a trajectory run averages, checked: device, output dtype, disk budget, copied tensors."""

    device: str
    dtype: str
    disk_budget: Optional[int]
    copy: tuple[str, ...]


def _averaging(device: str, dtype: str, disk_budget: Optional[str], copy: list[str], dry_run: bool) -> _Averaging:
    """A real run also finds out whether the device is there (importing torch); a dry run needs neither."""
    return _Averaging(opt.device(device) if dry_run else _device(device), opt.choice(dtype, opt.AVERAGE_DTYPES, "--dtype"),
                      opt.size(disk_budget, "--disk-budget") if disk_budget else None, opt.copy_patterns(copy))


def _run(source, spec, out_dir: Path, averaging: _Averaging, study: _Study, *, dry_run: bool, force: bool,
         keep_downloads: bool, quiet: bool, bars: _Bars, sizes=None) -> None:
    from .evalrun import find_targets, run_eval, study_hooks
    from .runner import execute_run, output_root, plan_run
    from .schedule import steps_of

    scoring = bool(study.tasks)
    store = None
    if scoring and not dry_run:  # a dry run writes nothing, not even an empty results store
        from .results import Store

        store = Store(study.results)
    try:
        done = None
        if store is not None and study.in_memory:
            done = lambda w: all(store.done(source.name, spec.tag(), w.step, t, study.limit or 0)  # noqa: E731
                                 for t in study.tasks)
        plan = plan_run(source, spec, out_dir, force=force, keep_downloads=keep_downloads,
                        disk_budget=averaging.disk_budget, sizes=sizes, done=done)
        if dry_run or not quiet:
            _print_plan(f"{source.name}: {spec.tag()}", plan, local=getattr(source, "local", False))
        if sizes is None:  # a real source: check its revisions before a byte is fetched
            if dry_run and source.local:
                err.print("local checkpoints are compared for duplicates when the run starts: a dry run reads no "
                          "tensor data", style="dim", highlight=False, soft_wrap=True)
            for dup in source.duplicates(steps_of(plan.todo), read_data=not dry_run):
                err.print(f"[bold yellow]warning:[/] {dup}: the trajectory serves the same checkpoint under "
                          f"different steps, and these averages will include it as given", highlight=False,
                          soft_wrap=True)
        if dry_run:
            return
        out_dtype = _torch_dtype(averaging.dtype)
        with bars:
            hooks: dict = {}
            if scoring:
                scorer = _scorer(study, store, bars, 2 * len(plan.windows) * len(study.tasks),
                                 device=averaging.device, dtype="auto", force=force)
                hooks = study_hooks(source.name, spec, {w.step for w in plan.todo}, scorer, originals=study.originals,
                                    in_memory=study.in_memory, device=averaging.device, out_dtype=out_dtype,
                                    copy=averaging.copy)
            written = execute_run(source, spec, plan, force=force, keep_downloads=keep_downloads,
                                  device=averaging.device, out_dtype=out_dtype, copy=averaging.copy, bars=bars, **hooks,
                                  on_window=None if quiet else
                                  lambda w, p: err.print(f"wrote {p}", highlight=False, soft_wrap=True))
            if scoring and not study.in_memory:  # the averages, and originals not scored on the way
                run_eval(find_targets(output_root(out_dir, source, spec), {w.step for w in plan.windows},
                                      study.originals), scorer, bars)
        if study.in_memory:
            err.print(f"{len(plan.todo)} window(s) averaged in memory and scored", highlight=False)
        else:
            err.print(f"{len(written)} output(s) written under {out_dir}", highlight=False)
        if scoring:
            err.print(f"{scorer.scored} task score(s) written to {study.results}, {scorer.failed} failed",
                      highlight=False)
    finally:
        if store is not None:
            store.close()


K_OPT = typer.Option(5, "--k", help="Checkpoints per LAWA window (EMA and SWA use the same checkpoint sequence).")
NU_OPT = typer.Option(1000, "--nu", help="Steps between the checkpoints of one window.")
INTERVAL_OPT = typer.Option(3000, "--interval", help="Steps between consecutive outputs.")
METHOD_OPT = typer.Option("lawa", help="lawa (uniform over the latest k), ema or swa.")
EMA_OPT = typer.Option(0.9, help="EMA: e_i = (1-alpha) e_(i-1) + alpha c_i over the checkpoint sequence.")
SWA_OPT = typer.Option(None, help="SWA: first step of the running mean (default: the first checkpoint of "
                       "the sequence).")
SKIP_OPT = typer.Option(False, help="Skip windows whose checkpoints are not all present instead of failing.")
DEVICE_OPT = typer.Option("auto", help="Where to do the arithmetic: auto (cuda if available), cpu or cuda.")
DTYPE_OPT = typer.Option("auto", help="Output dtype of averaged tensors: auto (as stored), float16, bfloat16, "
                         "float32 or float64.")
CACHE_OPT = typer.Option(None, help="Hugging Face cache folder for downloads (default: HF_HUB_CACHE, "
                         "~/.cache/huggingface/hub).")
KEEP_OPT = typer.Option(False, help="Keep every downloaded revision instead of deleting each one after its "
                        "last window (only revisions ckptavg downloaded are ever deleted).")
DRY_OPT = typer.Option(False, "--dry-run", help="Print the plan (windows, revisions, bytes to download, peak "
                       "disk) and exit.")
FORCE_OPT = typer.Option(False, "--force", help="Redo outputs that are already finished.")
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="No plan table or progress bars.")
PILE_OPT = typer.Option(None, help="A Pile-format file (.jsonl, .jsonl.zst or .jsonl.gz; records "
                        '{"text", "meta": {"pile_set_name"}}, like the Pile\'s val/test files) for the pile-* tasks.', rich_help_panel="Scoring")
PPL_OPT = typer.Option([], "--ppl-task", help="NAME=FILE.jsonl: a perplexity task over your own {\"text\": ...} "
                       "records (word and byte perplexity, bits per byte). Repeatable.", rich_help_panel="Scoring")
INCLUDE_OPT = typer.Option([], help="A folder of lm-eval task YAMLs to register. Repeatable.", rich_help_panel="Scoring")
LIMIT_OPT = typer.Option(None, help="At most N documents per task (for quick looks; stored apart from full scores).", rich_help_panel="Scoring")
BATCH_OPT = typer.Option("auto", help="lm-eval batch size: auto (8 on CPU) or N.", rich_help_panel="Scoring")
RESULTS_OPT = typer.Option(Path("results.sqlite"), help="SQLite results store (created if missing).", rich_help_panel="Scoring")
EVAL_DTYPE_OPT = typer.Option("auto", help="Model dtype for scoring: auto (float32 on CPU, as stored on a GPU), "
                              "float16, bfloat16 or float32.")
EVAL_OPT = typer.Option(None, "--eval", help="Also score with these lm-eval tasks (comma-separated, as in "
                        "`ckptavg eval`) into --results: each original while it is on disk for averaging, each average "
                        "once made, so a whole study fetches every revision once.", rich_help_panel="Scoring")
IN_MEMORY_OPT = typer.Option(False, "--in-memory", help="With --eval: average in memory and score, writing no model "
                             "folders, only results.", rich_help_panel="Scoring")
ORIGINALS_OPT = typer.Option(True, "--originals/--no-originals", help="With --eval: also score the original "
                             "checkpoint at each output step.", rich_help_panel="Scoring")


@app.command()
@user_errors
def trajectory(
    source: str = typer.Argument(..., help="A local folder of checkpoint folders named by step (step1000/, "
                                 "step2000/, ...), or a Hub model repo id whose branches are steps."),
    steps_from: str = typer.Option(r"step(\d+)", "--steps-from-branches", "--steps-from",
                                   help="Regular expression matching a branch or folder name in full; "
                                   "group 1 is its step."),
    k: int = K_OPT,
    nu: int = NU_OPT,
    interval: int = INTERVAL_OPT,
    start: Optional[int] = typer.Option(None, help="First output step (default: the first step with a full window)."),
    end: Optional[int] = typer.Option(None, help="Last output step (default: the last step of the trajectory)."),
    method: str = METHOD_OPT,
    ema_alpha: float = EMA_OPT,
    swa_start: Optional[int] = SWA_OPT,
    skip_incomplete: bool = SKIP_OPT,
    out_dir: Path = typer.Option(Path("out"), "--out", "-o", help="Outputs go to OUT/NAME/METHOD-TAG/stepN/."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    cache_dir: Optional[Path] = CACHE_OPT,
    disk_budget: Optional[str] = typer.Option(None, help="Refuse plans whose peak disk use (downloads plus one "
                                              "output) exceeds this, e.g. 200GB."),
    keep_downloads: bool = KEEP_OPT,
    copy: list[str] = COPY_OPT,
    dry_run: bool = DRY_OPT,
    force: bool = FORCE_OPT,
    study_tasks: Optional[str] = EVAL_OPT,
    pile: Optional[Path] = PILE_OPT,
    ppl_task: list[str] = PPL_OPT,
    include_path: list[Path] = INCLUDE_OPT,
    results: Path = RESULTS_OPT,
    limit: Optional[int] = LIMIT_OPT,
    batch_size: str = BATCH_OPT,
    originals: bool = ORIGINALS_OPT,
    in_memory: bool = IN_MEMORY_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Average a training trajectory window by window (LAWA, EMA or SWA), from local folders or the Hub.

    Each Hub revision is downloaded once, by commit id, into the Hugging Face cache and deleted after
    its last window. Finished outputs (with a ckptavg.json) are skipped, so an interrupted run resumes
    where it stopped.
    """
    from .schedule import check_parameters

    check_parameters(method, k, nu, interval, ema_alpha)
    averaging = _averaging(device, dtype, disk_budget, copy, dry_run)
    study = _study(study_tasks, pile, ppl_task, include_path, results, limit, batch_size, originals, in_memory,
                   register=not dry_run)
    bars = _Bars(quiet)
    src = _source(source, steps_from, cache_dir, bars)
    steps = src.steps()
    spec = _spec(method, k, nu, interval, start if start is not None else steps[0] + (k - 1) * nu,
                 end if end is not None else steps[-1], ema_alpha, swa_start, skip_incomplete)
    _run(src, spec, out_dir, averaging, study, dry_run=dry_run, force=force, keep_downloads=keep_downloads,
         quiet=quiet, bars=bars)


def _source(text: str, pattern: str, cache_dir: Optional[Path], bars: _Bars):
    from .hub import HubTrajectory, looks_like_repo_id
    from .sources import LocalTrajectory

    if Path(text).is_dir():
        return LocalTrajectory(Path(text), pattern)
    if looks_like_repo_id(text) and not Path(text).exists():
        return HubTrajectory(text, pattern, cache_dir=cache_dir, bars=bars)
    raise _fail(f"{text}: neither a local trajectory folder nor a Hub repo id (ORG/NAME)")


@app.command()
@user_errors
def pythia(
    model: str = typer.Option(..., "--model", help="Pythia size: 70m, 160m, 410m, 1b, 1.4b, 2.8b, 6.9b or 12b."),
    k: int = K_OPT,
    nu: int = NU_OPT,
    interval: int = INTERVAL_OPT,
    start: int = typer.Option(21000, help="First output step."),
    end: int = typer.Option(141000, help="Last output step."),
    deduped: bool = typer.Option(True, "--deduped/--no-deduped", help="The -deduped repos (default) or the originals."),
    method: str = METHOD_OPT,
    ema_alpha: float = EMA_OPT,
    swa_start: Optional[int] = SWA_OPT,
    out_dir: Path = typer.Option(Path("out"), "--out", "-o", help="Outputs go to OUT/pythia-SIZE[-deduped]/METHOD-TAG/stepN/."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    cache_dir: Optional[Path] = CACHE_OPT,
    disk_budget: Optional[str] = typer.Option("200GB", help="Refuse plans whose peak disk use (downloads plus one "
                                              "output) exceeds this."),
    keep_downloads: bool = KEEP_OPT,
    copy: list[str] = COPY_OPT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan from the built-in catalogue (offline, "
                                 "approximate fp16 sizes) and exit."),
    force: bool = FORCE_OPT,
    study_tasks: Optional[str] = EVAL_OPT,
    pile: Optional[Path] = PILE_OPT,
    ppl_task: list[str] = PPL_OPT,
    include_path: list[Path] = INCLUDE_OPT,
    results: Path = RESULTS_OPT,
    limit: Optional[int] = LIMIT_OPT,
    batch_size: str = BATCH_OPT,
    originals: bool = ORIGINALS_OPT,
    in_memory: bool = IN_MEMORY_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Average EleutherAI Pythia revisions from the Hub (LAWA by default: k=5, nu=1000, every 3000 steps).

    Before any download, the weight hashes of every branch are compared, and revisions that the Hub
    serves byte-identical to another step are listed (this happens on the public repos).
    """
    from . import pythia as catalogue
    from .hub import HubTrajectory

    info = catalogue.model(model)
    repo = info.repo_id(deduped)
    spec = _spec(method, k, nu, interval, start, end, ema_alpha, swa_start, False)
    spec.windows(None)  # the schedule's own checks, before the Hub is asked anything
    averaging = _averaging(device, dtype, disk_budget, copy, dry_run)
    study = _study(study_tasks, pile, ppl_task, include_path, results, limit, batch_size, originals, in_memory,
                   register=not dry_run)
    bars = _Bars(quiet)
    if dry_run:
        class CatalogueSource:
            name = repo.split("/")[1]
            missing_hint = ""

            @staticmethod
            def steps() -> list[int]:
                return catalogue.steps()

        sizes = {s: info.fp16_bytes for s in catalogue.steps()}
        _run(CatalogueSource(), spec, out_dir, averaging, study, dry_run=True, force=force,
             keep_downloads=keep_downloads, quiet=False, bars=bars, sizes=sizes)
        return
    src = HubTrajectory(repo, cache_dir=cache_dir, bars=bars)
    _run(src, spec, out_dir, averaging, study, dry_run=False, force=force, keep_downloads=keep_downloads, quiet=quiet,
         bars=bars)


@app.command()
@user_errors
def interpolate(
    a: Path = typer.Argument(..., help="Checkpoint A."),
    b: Path = typer.Argument(..., help="Checkpoint B (config, tokenizer and non-averaged tensors come from B)."),
    alphas: str = typer.Option("0,0.2,0.4,0.6,0.8,1", help="Comma-separated alphas; each output is "
                               "alpha*A + (1-alpha)*B (values outside [0, 1] extrapolate)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Outputs go to OUT/alpha{ALPHA}/."),
    device: str = typer.Option("auto", help="auto (cuda if available), cpu or cuda."),
    dtype: str = typer.Option("auto", help="Output dtype (auto: as stored in B)."),
    copy: list[str] = COPY_OPT,
    force: bool = typer.Option(False, "--force", help="Redo finished outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Linear interpolation between two checkpoints, a probe of linear mode connectivity."""
    from .average import average_checkpoints
    from .writer import read_manifest

    values = opt.floats(alphas, "--alphas")
    if not values:
        raise _fail("--alphas is empty")
    out_dtype = _torch_dtype(opt.choice(dtype, opt.AVERAGE_DTYPES, "--dtype"))
    patterns = opt.copy_patterns(copy)
    dev = _device(device)
    for alpha in values:
        target = out_dir / f"alpha{alpha:g}"
        if not force and read_manifest(target) is not None:
            err.print(f"skipped {target} (finished)", highlight=False)
            continue
        with _Bars(quiet) as bars:
            average_checkpoints([a, b], target, weights=[alpha, 1 - alpha], normalize=False, force=force,
                                device=dev, out_dtype=out_dtype, copy=patterns,
                                progress=bars.for_plan(f"alpha {alpha:g}"),
                                method={"name": "interpolate", "alpha": alpha, "a": str(a), "b": str(b)})
        err.print(f"wrote {target}", highlight=False)


def _scorer(study: _Study, store, bars: _Bars, total: int, *, device: str, dtype: str, force: bool):
    """The Scorer over the study's registered tasks, with a progress line over `total` scores."""
    from .evalrun import Scorer

    line = bars.progress.add_task("scoring", total=total) if bars.progress else None

    def on_task(target, task, status):
        if status.startswith("failed"):
            err.print(f"[yellow]failed:[/] {target.model} {target.tag} step{target.step} {task}: {status[8:]}",
                      highlight=False, soft_wrap=True)
        if line is not None:
            bars.progress.update(line, advance=1, description=f"score {target.tag} step{target.step} {task}")

    return Scorer(study.tasks, store, study.manager, device=device, dtype=dtype, batch_size=study.batch_size,
                  limit=study.limit, force=force, on_task=on_task)


@app.command("eval")
@user_errors
def eval_(
    run_dir: Path = typer.Argument(..., help="A folder holding finished outputs at any depth: the --out of a "
                                   "trajectory run (OUT), one trajectory (OUT/NAME) or one run (OUT/NAME/METHOD-TAG). "
                                   "Model and run are read from each output's manifest."),
    tasks: str = typer.Option(",".join(DEFAULT_TASKS), help="Comma-separated lm-eval tasks. pile-philpapers, "
                              "pile-bookcorpus2, pile-youtubesubtitles and pile-enron come from --pile; the others "
                              "are lm-eval's own tasks."),
    pile: Optional[Path] = PILE_OPT,
    ppl_task: list[str] = PPL_OPT,
    include_path: list[Path] = INCLUDE_OPT,
    originals: bool = typer.Option(True, "--originals/--no-originals", help="Also score the original checkpoint "
                                   "at each averaged step (fetched from the Hub if it is no longer on disk)."),
    steps: Optional[str] = typer.Option(None, help="Only these steps, comma-separated (default: every finished output)."),
    limit: Optional[int] = LIMIT_OPT,
    batch_size: str = BATCH_OPT,
    device: str = typer.Option("auto", help="Where to run the models: auto (cuda if available), cpu or cuda."),
    dtype: str = EVAL_DTYPE_OPT,
    results: Path = RESULTS_OPT,
    force: bool = typer.Option(False, "--force", help="Score again what the store already has."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be scored and fetched, and exit."),
    quiet: bool = QUIET_OPT,
) -> None:
    """Score averaged checkpoints and their originals with lm-evaluation-harness into a results store.

    Each checkpoint x task is one row group in the store; what is already there is skipped, so an
    interrupted study resumes. A task that fails for one checkpoint is stored as failed (and retried
    next time) and the study goes on.
    """
    from .evalrun import fetch_bytes, find_targets
    from .results import ORIGINAL

    wanted_steps = opt.ints(steps, "--steps") if steps else None
    eval_dtype = opt.choice(dtype, opt.EVAL_DTYPES, "--dtype")
    dev = opt.device(device) if dry_run else _device(device)
    study = _study(tasks, pile, ppl_task, include_path, results, limit, batch_size, originals, False,
                   register=not dry_run)
    targets = find_targets(run_dir, wanted_steps, originals)
    averaged = [t for t in targets if t.tag != ORIGINAL]
    runs = {(t.model, t.tag) for t in averaged}
    to_fetch = fetch_bytes(targets)
    err.print(f"{len(averaged)} finished output(s) in {len(runs)} run(s) under {run_dir}; {len(targets)} checkpoint(s) "
              f"x {len(study.tasks)} task(s); originals to fetch from the Hub: {sum(1 for t in targets if t.repo)} "
              f"({format_size(to_fetch)})", highlight=False, soft_wrap=True)
    if dry_run:
        for t in targets:
            out.print(f"{t.model}  {t.tag:<24} step{t.step:<8} {t.folder if not t.repo else 'hf://' + t.repo + '@' + str(t.revision)}",
                      highlight=False, soft_wrap=True)
        return

    from .evalrun import run_eval
    from .results import Store

    bars = _Bars(quiet)
    with Store(results) as store, bars:
        scorer = _scorer(study, store, bars, len(targets) * len(study.tasks), device=dev, dtype=eval_dtype,
                         force=force)
        run_eval(targets, scorer, bars)
    err.print(f"{scorer.scored} task score(s) written to {results}, {scorer.failed} failed", highlight=False)


FORMATS = ("table", "csv", "json")


@app.command()
@user_errors
def results(
    store: Path = typer.Argument(Path("results.sqlite"), help="The results store written by `ckptavg eval`."),
    fmt: str = typer.Option("table", "--format", help="table (the paper's Table 2 layout), csv or json (tidy rows)."),
    model: Optional[str] = typer.Option(None, help="Only this trajectory (e.g. pythia-1b-deduped)."),
    task: Optional[str] = typer.Option(None, help="Only this task."),
    metric: Optional[str] = typer.Option(None, help="The metric to show per task (default: word_perplexity for "
                                         "perplexity tasks, acc for the others)."),
    failed: bool = typer.Option(False, "--failed", help="List failed checkpoint x task pairs and their errors instead."),
) -> None:
    """Print stored scores: originals against averages, step by step."""
    from .results import open_results
    from .tables import tidy, wide_table

    opt.choice(fmt, FORMATS, "--format")
    with open_results(store) as db:
        rows = db.rows(model=model, task=task, status="failed" if failed else "ok")
    if failed:
        for r in rows:
            out.print(f"{r.model} {r.tag} step{r.step} {r.task}: {r.error}", highlight=False, soft_wrap=True)
        err.print(f"{len(rows)} failed checkpoint x task pair(s)", highlight=False)
        return
    if metric:
        rows = [r for r in rows if r.metric == metric]
    if not rows:
        raise _fail(f"{store}: no results" + (" matching the filters" if model or task or metric else ""))
    if fmt in ("csv", "json"):
        _print_records(tidy(rows), fmt, "")
    else:
        _print_wide(wide_table(rows, metric))


def _print_wide(table) -> None:
    """The wide layout, split into several tables by task when it is wider than the console."""
    from rich.table import Table

    from .results import ORIGINAL

    tasks = list(dict.fromkeys(c.task for c in table.columns))
    groups, width, room = [[]], 0, max(out.width - 16, 30)
    for task in tasks:
        need = 12 * sum(c.task == task for c in table.columns)
        if groups[-1] and width + need > room:
            groups.append([])
            width = 0
        groups[-1].append(task)
        width += need
    for group in groups:
        cols = [(i, c) for i, c in enumerate(table.columns) if c.task in group]
        t = Table(title_justify="left")
        t.add_column("model", no_wrap=True)
        t.add_column("step", justify="right")
        for _, c in cols:
            t.add_column(f"{c.task}\n{c.metric}\n{c.tag}", justify="right", overflow="fold")
        for model, step, values in table.rows:
            cells = []
            for i, c in cols:
                v = values[i]
                original = next((values[j] for j, cc in enumerate(table.columns)
                                 if cc.task == c.task and cc.tag == ORIGINAL), None)
                text = "-" if v is None else f"{v:.4g}"
                if (v is not None and original is not None and c.tag != ORIGINAL and c.higher_is_better is not None
                        and v != original and (v > original) == c.higher_is_better):
                    text = f"[bold green]{text}[/]"
                cells.append(text)
            t.add_row(model, str(step), *cells)
        out.print(t)
    out.print("green: the average beats the original at that step", style="dim")


@app.command()
@user_errors
def plot(
    store: Path = typer.Argument(Path("results.sqlite"), help="The results store written by `ckptavg eval`."),
    task: str = typer.Option(..., help="The task to plot, e.g. pile-philpapers."),
    metric: Optional[str] = typer.Option(None, help="The metric (default: word_perplexity for perplexity tasks, "
                                         "acc for the others)."),
    model: Optional[str] = typer.Option(None, help="Only this trajectory (default: every one in the store)."),
    compare: Optional[str] = typer.Option(None, help="Comma-separated methods or run tags to draw side by side, e.g. "
                                          "lawa,ema,swa (default: every run)."),
    original: bool = typer.Option(True, "--original/--no-original", help="Draw the original trajectory too."),
    out_file: Path = typer.Option(Path("plot.png"), "--out", "-o", help="The image to write (.png, .pdf, .svg)."),
    title: Optional[str] = typer.Option(None, help="Figure title."),
) -> None:
    """Draw a metric against training step: the original trajectory and the averaged ones."""
    from .plots import plot_trajectories
    from .results import ORIGINAL, open_results
    from .tables import primary_metric

    opt.image_file(out_file, "--out")
    with open_results(store) as db:
        rows = db.rows(model=model, task=task)
    if not rows:
        raise _fail(f"{store}: no results for task {task!r}" + (f" and model {model!r}" if model else ""))
    chosen = metric or primary_metric(r.metric for r in rows)
    if compare:
        wanted = {w.strip() for w in compare.split(",") if w.strip()}
        rows = [r for r in rows if r.tag == ORIGINAL or r.method in wanted or r.tag in wanted]
    if not original:
        rows = [r for r in rows if r.tag != ORIGINAL]
    path = plot_trajectories(rows, task, chosen, out_file, title)
    err.print(f"wrote {path}", highlight=False)


@app.command()
@user_errors
def savings(
    store: Path = typer.Argument(Path("results.sqlite"), help="The results store written by `ckptavg eval`."),
    model: str = typer.Option(..., help="Comma-separated trajectories as stored (e.g. pythia-6.9b-deduped, or a "
                              "Pythia size such as 6.9b)."),
    task: str = typer.Option(..., help="The task, e.g. pile-philpapers."),
    metric: Optional[str] = typer.Option(None, help="The metric (default: word_perplexity for perplexity tasks, "
                                         "acc for the others); whether higher is better comes from lm-eval."),
    tag: Optional[str] = typer.Option(None, help="The averaging run to credit, e.g. lawa-k5-nu1000 (needed when "
                                      "the store has several for a model)."),
    tolerance: str = typer.Option("0,0.5,1,2,5", help="Comma-separated tolerances in percent of the original's "
                                  "final value."),
    total_steps: int = typer.Option(143000, help="Steps of the whole training run (Pythia: 143000)."),
    gpu_hours: Optional[float] = typer.Option(None, help="GPU hours of the whole run (default: the published "
                                              "figure for Pythia 1b, 2.8b, 6.9b and 12b)."),
    usd_per_gpu_hour: Optional[float] = typer.Option(None, help="Also show the savings in dollars at this price."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json."),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="Also draw GPU hours saved against tolerance, "
                                             "one line per model."),
) -> None:
    """GPU hours saved by averaging: how much earlier the averaged curve reaches the original's final value."""
    from .results import ORIGINAL, open_results
    from .savings import SavingsError, catalogue_gpu_hours, match_model
    from .savings import savings as compute
    from .tables import primary_metric

    opt.choice(fmt, FORMATS, "--format")
    if plot_file is not None:
        opt.image_file(plot_file, "--plot")
    tolerances = opt.floats(tolerance, "--tolerance")
    if not tolerances:
        raise _fail("--tolerance is empty")
    with open_results(store) as db:
        rows = db.rows(task=task)
    if not rows:
        raise _fail(f"{store}: no results for task {task!r}")
    chosen = metric or primary_metric(r.metric for r in rows)
    rows = [r for r in rows if r.metric == chosen]
    if not rows:
        raise _fail(f"{store}: no {chosen!r} results for task {task!r}")
    stored = sorted({r.model for r in rows})
    table = []
    for name in [m.strip() for m in model.split(",") if m.strip()]:
        m = match_model(name, stored)
        mine = [r for r in rows if r.model == m]
        tags = sorted({r.tag for r in mine if r.tag != ORIGINAL})
        run = tag or (tags[0] if len(tags) == 1 else None)
        if run is None or run not in tags:
            raise SavingsError(f"{m}: choose the averaging run with --tag ({', '.join(tags) or 'none stored'})")
        hours = gpu_hours or catalogue_gpu_hours(m)
        if hours is None:
            raise SavingsError(f"{m}: no published GPU hours; give --gpu-hours")
        better = next((r.higher_is_better for r in mine if r.higher_is_better is not None), False)
        original_curve = [(r.step, r.value) for r in mine if r.tag == ORIGINAL]
        averaged_curve = [(r.step, r.value) for r in mine if r.tag == run]
        for s in compute(original_curve, averaged_curve, tolerances, total_steps=total_steps, gpu_hours=hours,
                         higher_is_better=better, usd_per_gpu_hour=usd_per_gpu_hour):
            table.append({"model": m, "tag": run, "task": task, "metric": chosen, "tolerance_pct": s.tolerance,
                          "target": s.target, "step_reached": s.step, "original_reached": s.original_step,
                          "steps_saved": s.steps_saved,
                          "pct_of_training": None if s.fraction is None else 100 * s.fraction,
                          "gpu_hours_saved": s.gpu_hours} | ({"usd_saved": s.usd} if usd_per_gpu_hour else {}))
    runs = ", ".join(dict.fromkeys(r["tag"] for r in table))
    _print_records(table, fmt, f"GPU hours saved by {runs} on {task} ({chosen})")
    if plot_file:
        from .plots import plot_savings

        err.print(f"wrote {plot_savings(table, plot_file)}", highlight=False)


def _print_records(records: list[dict], fmt: str, title: str) -> None:
    if fmt == "json":
        import json

        out.print_json(json.dumps(records))
        return
    if fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        return
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    cols = [c for c in records[0] if c not in ("task", "metric", "tag")]  # those are in the title
    headers = {"tolerance_pct": "tolerance", "step_reached": "averaged reaches it at",
               "original_reached": "original reaches it at", "pct_of_training": "% of run",
               "gpu_hours_saved": "GPU hours saved", "usd_saved": "USD saved"}
    for c in cols:
        t.add_column(headers.get(c, c.replace("_", " ")), justify="left" if c == "model" else "right",
                     no_wrap=c == "model")
    for rec in records:
        t.add_row(*[_cell(c, rec[c], rec) for c in cols])
    out.print(t)


def _cell(column: str, value, record: dict) -> str:
    if value is None:
        return "never reached" if column == "step_reached" else "-"
    if column in ("model", "tag"):
        return str(value)
    if column == "tolerance_pct":
        return f"{value:g}%"
    if column in ("step_reached", "original_reached", "steps_saved"):
        return f"{value:,.0f}"
    if column == "pct_of_training":
        return f"{value:.1f}%"
    if column in ("gpu_hours_saved", "usd_saved"):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return f"${text}" if column == "usd_saved" else text
    return f"{value:.4g}"


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")
    # tqdm reads this once, at import: lm-eval, datasets and transformers draw bars that would
    # scroll past ours (ckptavg draws its own progress with rich)
    os.environ.setdefault("TQDM_DISABLE", "1")
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    app(prog_name="ckptavg")


if __name__ == "__main__":
    main()
    sys.exit(0)
