"""What the stored scores say: rows, the GPU hours saved, and figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .. import options as opt
from ..errors import OptionError, SavingsError


def savings_table(store: str | Path, models: Sequence[str], task: str, *, metric: str | None = None,
                  tag: str | None = None, tolerances: Sequence[float] = (0, 0.5, 1, 2, 5),
                  total_steps: int | None = None, gpu_hours: float | None = None,
                  usd_per_gpu_hour: float | None = None) -> tuple[str, list]:
    """(metric, one `report.savings.SavingsRecord` per model and tolerance): GPU hours saved by the averaged
    run `tag` of each model (a stored name, or a Pythia size such as 6.9b) on `task`."""
    from ..report.savings import savings_records
    from ..report.store import open_results

    if not tolerances:
        raise OptionError("--tolerance is empty")
    with open_results(store) as db:
        rows = db.rows(task=task)
    if not rows:
        raise SavingsError(f"{store}: no results for task {task!r}")
    return savings_records(rows, models, task, metric=metric, tag=tag, tolerances=tolerances, total_steps=total_steps,
                           gpu_hours=gpu_hours, usd_per_gpu_hour=usd_per_gpu_hour, where=str(store))


# -- results and figures ----------------------------------------------------------------------------
def result_rows(store: str | Path, *, model: str | None = None, task: str | None = None, metric: str | None = None,
                failed: bool = False) -> list:
    """Stored rows (`report.store.Row`): successful scores, or with `failed` the failed checkpoint x task pairs."""
    from ..report.store import open_results

    with open_results(store) as db:
        rows = db.rows(model=model, task=task, status="failed" if failed else "ok")
    return [r for r in rows if r.metric == metric] if metric and not failed else rows


def plot(store: str | Path, task: str, out: str | Path, *, metric: str | None = None, model: str | None = None,
         compare: Sequence[str] = (), original: bool = True, title: str | None = None) -> Path:
    """A metric against training step: the original trajectory and the averaged runs (`compare`: only these
    methods or run tags)."""
    from ..errors import InputError
    from ..report.plots import plot_trajectories
    from ..report.store import ORIGINAL
    from ..report.tables import primary_metric

    opt.image_file(Path(out), "--out")
    rows = result_rows(store, model=model, task=task)
    if not rows:
        raise InputError(f"{store}: no results for task {task!r}" + (f" and model {model!r}" if model else ""))
    chosen = metric or primary_metric(r.metric for r in rows)
    if compare:
        rows = [r for r in rows if r.tag == ORIGINAL or r.method in compare or r.tag in compare]
    if not original:
        rows = [r for r in rows if r.tag != ORIGINAL]
    return plot_trajectories(rows, task, chosen, Path(out), title)
