"""`ckptavg tasks list|fetch`: where each lm-eval task's data comes from, and fetching it for offline nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..evaluation.harness import DEFAULT_TASKS
from .console import app, out, say, user_errors

tasks_app = typer.Typer(help="Where each task's data comes from, whether it is cached, and fetching it into the "
                        "Hugging Face cache for compute nodes without a network.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
TASKS_OPT = typer.Option(",".join(DEFAULT_TASKS), "--tasks", help="Comma-separated lm-eval tasks (default: the "
                         "paper's).")
INCLUDE_OPT = typer.Option([], "--include-path", help="A folder of lm-eval task YAMLs to register. Repeatable.")
PILE_OPT = typer.Option(None, "--pile", help="The Pile-format file the pile-* tasks are cut from (local: nothing "
                        "to fetch).")


def _sources(tasks: str, include_path: list[Path], pile: Optional[Path]):
    from ..api import scoring, task_sources
    from ..evaluation.tasks import PILE_SUBSETS

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    local = [t for t in names if t in PILE_SUBSETS and pile is None]  # from a local file, whatever it is
    rest = [t for t in names if t not in local]
    checked = scoring(",".join(rest), pile=pile, include_path=include_path, register=False) if rest else None
    return local, (task_sources(checked) if checked else [])


@tasks_app.command("list")
@user_errors
def list_(tasks: str = TASKS_OPT, include_path: list[Path] = INCLUDE_OPT, pile: Optional[Path] = PILE_OPT) -> None:
    """Each task's data: the Hub dataset (repo and config) and splits its lm-eval config reads, whether the
    datasets cache has it, and what a name means where lm-eval and older papers differ (wsc, wsc273)."""
    from rich.table import Table

    from ..evaluation.taskdata import cached

    local, sources = _sources(tasks, include_path, pile)
    table = Table(title="where each task's data comes from", title_justify="left")
    for col in ("task", "dataset (config)", "splits", "cached", "note"):
        table.add_column(col)
    for t in local:
        table.add_row(t, "--pile FILE (local)", "-", "local", "cut from a Pile-format file")
    for d in sources:
        state = cached(d)
        table.add_row(d.task, d.where, ", ".join(d.splits), "local" if state is None else "yes" if state else "no",
                      d.note)
    out.print(table)


@tasks_app.command("fetch")
@user_errors
def fetch(tasks: str = typer.Argument(..., help="Comma-separated lm-eval tasks whose data to fetch."),
          include_path: list[Path] = INCLUDE_OPT, pile: Optional[Path] = PILE_OPT) -> None:
    """Download and prepare the tasks' Hub datasets into the Hugging Face cache (HF_HOME), as lm-eval will read
    them; then scoring needs no network (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1). Cached ones are skipped."""
    from ..api import fetch_task_data

    _, sources = _sources(tasks, include_path, pile)
    done = fetch_task_data(sources, lambda d: say(f"fetching {d.where} for {d.task}"))
    say(f"{done} dataset(s) fetched; {sum(d.on_hub for d in sources) - done} already cached; "
        f"{sum(not d.on_hub for d in sources)} local")
