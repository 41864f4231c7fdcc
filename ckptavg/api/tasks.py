"""Where the tasks' data comes from, and fetching it (`evaluation/taskdata.py`) for offline nodes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .settings import Scoring, task_index


def task_sources(scoring: Scoring) -> list:
    """Where each task's data comes from (`evaluation.taskdata.TaskData`: repo, config, splits), as lm-eval's
    configs say; the PILE subsets and --ppl-task files are local. Registers the tasks, checking nothing
    about their data (that is what this is for)."""
    from ..evaluation.taskdata import task_data

    manager = task_index(scoring)
    return task_data(manager, scoring.tasks)


def fetch_task_data(sources: Sequence, on_fetch: Callable[[object], None] | None = None) -> int:
    """Download and prepare every Hub dataset of `sources` (`task_sources`) not in the cache yet, into the
    caches later runs read (`HF_HOME`), on a machine with a network. Returns how many were fetched."""
    from ..evaluation.taskdata import cached, fetch

    done = 0
    for d in sources:
        if d.on_hub and not cached(d):
            if on_fetch is not None:
                on_fetch(d)
            fetch(d)
            done += 1
    return done
