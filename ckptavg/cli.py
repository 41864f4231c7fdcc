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


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    app(prog_name="ckptavg")


if __name__ == "__main__":
    main()
    sys.exit(0)
