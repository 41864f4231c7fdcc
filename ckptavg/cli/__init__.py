"""The `ckptavg` command line: each module declares its commands on the one Typer app; they parse
options, call `ckptavg.api`, and print."""

from __future__ import annotations

import os
import signal

# each registers its commands; `ckptavg --help` lists them in this order, the pipeline's
# isort: off
from . import average, trajectory, evaluate, report, study, tasks  # noqa: F401
# isort: on
from .console import app


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")
    # tqdm reads this once, at import: lm-eval, datasets and transformers draw bars that would
    # scroll past ours (ckptavg draws its own progress with rich)
    os.environ.setdefault("TQDM_DISABLE", "1")
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    app(prog_name="ckptavg")


__all__ = ["app", "main"]
