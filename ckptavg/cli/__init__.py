"""The `ckptavg` command line: each module declares its commands on the one Typer app; they parse
options, call `ckptavg.api`, and print."""

from __future__ import annotations

import gc
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
    try:
        app(prog_name="ckptavg")
    finally:
        # The interpreter's last garbage collection walks every object torch's import made: 0.25-0.4 s
        # of every command here (1.17-1.42 s against 0.94-1.12 s for an import and exit). Frozen, they
        # are left to the process's end; atexit handlers and module teardown still run.
        gc.freeze()


__all__ = ["app", "main"]
