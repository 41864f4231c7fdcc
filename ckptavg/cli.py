"""The `ckptavg` command line: argument parsing and printing only; the work lives in the library."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from .errors import CkptavgError
from .units import format_size, parse_size

app = typer.Typer(
    help="Post-hoc checkpoint averaging (LAWA, EMA, SWA) of language-model training trajectories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
err = Console(stderr=True)
out = Console()

DTYPES = ("auto", "float16", "bfloat16", "float32", "float64")


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def user_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and exit code 2; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CkptavgError as e:
            raise _fail(str(e)) from None
        except KeyboardInterrupt:
            err.print("interrupted: no partial output was left behind")
            raise typer.Exit(130) from None

    return wrapper


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise _fail(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return None if name == "auto" else getattr(torch, name)


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise _fail(f"{what} must be comma-separated numbers, got {text!r}") from None


def _size(text: str, what: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise _fail(f"{what}: {e}") from None


def _byte_progress(description: str, quiet: bool):
    """A factory the library calls with the plan, returning a bytes-written callback."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    state: dict = {}

    def start(plan):
        if quiet:
            return None
        bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True)
        bar.start()
        task = bar.add_task(description, total=plan.output_bytes)
        state["bar"] = bar
        return lambda n: bar.advance(task, n)

    def stop():
        if "bar" in state:
            state.pop("bar").stop()

    return start, stop


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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Average local checkpoints tensor by tensor into a new model folder.

    Inputs may be model.safetensors, sharded safetensors with an index, pytorch_model.bin, or
    sharded .bin with an index, in any mix. Floats are accumulated in float32 (or float64) and
    cast once; integer and boolean buffers are copied from the newest input. The output is
    written under a temporary name and appears only when complete, with ckptavg.json last.
    """
    from .average import average_checkpoints

    out_dtype = _torch_dtype(dtype)
    acc = _torch_dtype(accumulate)
    if acc is None or acc.itemsize < 4:
        raise _fail("--accumulate must be float32 or float64")
    w = _parse_floats(weights, "--weights") if weights else None
    start, stop = _byte_progress("averaging", quiet)
    try:
        result = average_checkpoints(srcs, out_dir, weights=w, normalize=normalize, out_dtype=out_dtype,
                                     accumulate=acc, device=device, shard_bytes=_size(shard_size, "--shard-size"),
                                     force=force, hash_inputs=hash_inputs, progress=start)
    finally:
        stop()
    from .writer import read_manifest

    manifest = read_manifest(result) or {}
    size = manifest.get("output", {}).get("tensor_bytes", 0)
    err.print(f"wrote {result} ({format_size(size)}, {len(srcs)} inputs, {manifest.get('seconds', 0):.1f} s)",
              highlight=False)


def _spec(method: str, k: int, nu: int, interval: int, start: int, end: int, ema_alpha: float,
          swa_start: Optional[int], skip_incomplete: bool):
    from .runner import RunSpec

    return RunSpec(method, k, nu, interval, start, end, ema_alpha, swa_start, skip_incomplete)


def _print_plan(title: str, plan) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("output step", "checkpoints", "to fetch", "disk after"):
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
    out.print(f"{len(plan.todo)} window(s) to average ({done} already finished), "
              f"{len(plan.fetch.fetches)} revision(s) to fetch, {format_size(plan.fetch.download_bytes)} to download, "
              f"peak disk {format_size(plan.fetch.peak_disk)}", highlight=False, soft_wrap=True)


def _run(source, spec, out_dir: Path, *, dry_run: bool, force: bool, keep_downloads: bool, disk_budget: str,
         device: str, dtype: str, quiet: bool, sizes=None) -> None:
    from .runner import execute_run, plan_run

    budget = _size(disk_budget, "--disk-budget") if disk_budget else None
    plan = plan_run(source, spec, out_dir, force=force, keep_downloads=keep_downloads, disk_budget=budget,
                    sizes=sizes)
    if dry_run or not quiet:
        _print_plan(f"{source.name}: {spec.tag()}", plan)
    if dry_run:
        return
    start, stop = _byte_progress("averaging", quiet)
    try:
        written = execute_run(source, spec, plan, force=force, device=device, out_dtype=_torch_dtype(dtype),
                              progress=start,
                              on_window=lambda w, p: (stop(), err.print(f"wrote {p}", highlight=False, soft_wrap=True)))
    finally:
        stop()
    err.print(f"{len(written)} output(s) written under {out_dir}", highlight=False)


K_HELP = "Checkpoints per LAWA window (EMA and SWA use the same checkpoint sequence)."
NU_HELP = "Steps between the checkpoints of one window."
INTERVAL_HELP = "Steps between consecutive outputs."
METHOD_HELP = "lawa (uniform over the latest k), ema or swa."


@app.command()
@user_errors
def trajectory(
    source: Path = typer.Argument(..., help="A local trajectory: a folder of checkpoint folders named by step "
                                  "(step1000/, step2000/, ...)."),
    steps_from: str = typer.Option(r"step(\d+)", "--steps-from-branches", "--steps-from",
                                   help="Regular expression matching a checkpoint's name; group 1 is its step."),
    k: int = typer.Option(5, "--k", help=K_HELP),
    nu: int = typer.Option(1000, "--nu", help=NU_HELP),
    interval: int = typer.Option(3000, "--interval", help=INTERVAL_HELP),
    start: Optional[int] = typer.Option(None, help="First output step (default: the first step with a full window)."),
    end: Optional[int] = typer.Option(None, help="Last output step (default: the last step of the trajectory)."),
    method: str = typer.Option("lawa", help=METHOD_HELP),
    ema_alpha: float = typer.Option(0.9, help="EMA: e_i = (1-alpha) e_(i-1) + alpha c_i."),
    swa_start: Optional[int] = typer.Option(None, help="SWA: first step of the running mean (default: the first "
                                            "checkpoint of the sequence)."),
    skip_incomplete: bool = typer.Option(False, help="Skip windows whose checkpoints are not all present "
                                         "instead of failing."),
    out_dir: Path = typer.Option(Path("out"), "--out", "-o", help="Outputs go to OUT/NAME/METHOD-TAG/stepN/."),
    device: str = typer.Option("auto", help="auto (cuda if available), cpu or cuda."),
    dtype: str = typer.Option("auto", help="Output dtype of averaged tensors (auto: as stored)."),
    disk_budget: Optional[str] = typer.Option(None, help="Refuse plans whose peak disk use exceeds this (e.g. 200GB)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit."),
    force: bool = typer.Option(False, "--force", help="Redo outputs that are already finished."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No plan table or progress bar."),
) -> None:
    """Average a local training trajectory window by window (LAWA, EMA or SWA).

    Finished outputs (with a ckptavg.json) are skipped, so an interrupted run resumes where it stopped.
    """
    from .sources import LocalTrajectory

    src = LocalTrajectory(source, steps_from)
    steps = src.steps()
    spec = _spec(method, k, nu, interval, start if start is not None else steps[0] + (k - 1) * nu,
                 end if end is not None else steps[-1], ema_alpha, swa_start, skip_incomplete)
    _run(src, spec, out_dir, dry_run=dry_run, force=force, keep_downloads=True, disk_budget=disk_budget,
         device=device, dtype=dtype, quiet=quiet)


@app.command()
@user_errors
def pythia(
    model: str = typer.Option(..., "--model", help="Pythia size: 70m, 160m, 410m, 1b, 1.4b, 2.8b, 6.9b or 12b."),
    k: int = typer.Option(5, "--k", help=K_HELP),
    nu: int = typer.Option(1000, "--nu", help=NU_HELP),
    interval: int = typer.Option(3000, "--interval", help=INTERVAL_HELP),
    start: int = typer.Option(21000, help="First output step."),
    end: int = typer.Option(141000, help="Last output step."),
    deduped: bool = typer.Option(True, "--deduped/--no-deduped", help="The -deduped repos (default) or the originals."),
    method: str = typer.Option("lawa", help=METHOD_HELP),
    ema_alpha: float = typer.Option(0.9, help="EMA: e_i = (1-alpha) e_(i-1) + alpha c_i."),
    swa_start: Optional[int] = typer.Option(None, help="SWA: first step of the running mean."),
    out_dir: Path = typer.Option(Path("out"), "--out", "-o", help="Outputs go to OUT/REPO/METHOD-TAG/stepN/."),
    disk_budget: Optional[str] = typer.Option("200GB", help="Refuse plans whose peak disk use exceeds this."),
    keep_downloads: bool = typer.Option(False, help="Keep every downloaded revision instead of deleting each "
                                        "after its last window."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (from the catalogue, offline) and exit."),
) -> None:
    """Plan LAWA/EMA/SWA over EleutherAI Pythia revisions (step21000 ... step141000).

    Only --dry-run works in this version: it prints every window, the revisions each needs, bytes to
    download and the peak disk, from the built-in catalogue and without network access.
    """
    from . import pythia as catalogue

    info = catalogue.model(model)

    class CatalogueSource:
        name = info.repo_id(deduped).split("/")[1]

        @staticmethod
        def steps() -> list[int]:
            return catalogue.steps()

    spec = _spec(method, k, nu, interval, start, end, ema_alpha, swa_start, False)
    if not dry_run:
        raise _fail("downloading Pythia revisions from the Hub is not available yet: use --dry-run to see the "
                    "plan, or `ckptavg trajectory` on local checkpoints")
    sizes = {s: info.fp16_bytes for s in catalogue.steps()}
    _run(CatalogueSource(), spec, out_dir, dry_run=True, force=False, keep_downloads=keep_downloads,
         disk_budget=disk_budget, device="cpu", dtype="auto", quiet=False, sizes=sizes)


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
    force: bool = typer.Option(False, "--force", help="Redo finished outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Linear interpolation between two checkpoints, a probe of linear mode connectivity."""
    from .average import average_checkpoints
    from .writer import read_manifest

    values = _parse_floats(alphas, "--alphas")
    if not values:
        raise _fail("--alphas is empty")
    for alpha in values:
        target = out_dir / f"alpha{alpha:g}"
        if not force and read_manifest(target) is not None:
            err.print(f"skipped {target} (finished)", highlight=False)
            continue
        start, stop = _byte_progress(f"alpha {alpha:g}", quiet)
        try:
            average_checkpoints([a, b], target, weights=[alpha, 1 - alpha], normalize=False, force=force,
                                device=device, out_dtype=_torch_dtype(dtype), progress=start,
                                method={"name": "interpolate", "alpha": alpha, "a": str(a), "b": str(b)})
        finally:
            stop()
        err.print(f"wrote {target}", highlight=False)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    app(prog_name="ckptavg")


if __name__ == "__main__":
    main()
    sys.exit(0)
