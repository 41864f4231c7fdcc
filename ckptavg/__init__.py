"""ckptavg: post-hoc checkpoint averaging of language-model training trajectories.

The package reads as the pipeline:

    trajectory/   where checkpoints come from, which windows to average, the run that fetches them
    engine/       one weighted average: plan, read, accumulate, write
    checkpoints/  what each format and trainer layout is: every checkpoint turned into one typed index
    evaluation/   scoring checkpoints with lm-evaluation-harness
    report/       the results store, tables, plots, savings
    api.py        every command as a function; cli/ only parses options and prints

`checkpoints/index.py`, `manifest.py` and `layout.py` are the contracts between them: the tensors of a
checkpoint, the manifest that marks a finished output, and where outputs go.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "average_checkpoints", "average_in_memory", "open_checkpoint", "plan_average"]

_LAZY = {  # imported on first use, so that `ckptavg --help` and planning never pay for importing torch
    "average_checkpoints": "engine.average",
    "average_in_memory": "engine.average",
    "open_checkpoint": "checkpoints.open",
    "plan_average": "engine.plan",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(name)
    from importlib import import_module

    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
