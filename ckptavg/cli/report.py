"""`ckptavg results`, `plot` and `savings`: what the stored scores say. No torch is imported."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .. import options as opt
from .console import app, compact_table, fail, out, say, user_errors

FORMATS = ("table", "csv", "json")
STORE_ARG = typer.Argument(Path("results.sqlite"), help="The results store written by `ckptavg eval`.")


@app.command()
@user_errors
def results(
    store: Path = STORE_ARG,
    fmt: str = typer.Option("table", "--format", help="table (the paper's Table 2 layout), csv or json (tidy rows)."),
    model: Optional[str] = typer.Option(None, help="Only this trajectory (e.g. pythia-1b-deduped)."),
    task: Optional[str] = typer.Option(None, help="Only this task."),
    metric: Optional[str] = typer.Option(None, help="The metric to show per task (default: word_perplexity for "
                                         "perplexity tasks, acc for the others)."),
    failed: bool = typer.Option(False, "--failed", help="List failed checkpoint x task pairs and their errors "
                                "instead."),
    export: Optional[tuple[str, str]] = typer.Option(None, "--export", metavar="KIND TARGET", help="Log the stored "
                                           "scores to a tracker instead of printing them: tensorboard DIR, mlflow "
                                           "TRACKING-URI or wandb PROJECT (one run per trajectory, series "
                                           "eval/RUN-TAG/TASK/METRIC by step). Each score goes to a tracker once; "
                                           "what it has had already is skipped.",
                                           show_default=False),
    force: bool = typer.Option(False, "--force", help="With --export: log every score again, even those the "
                               "tracker has had."),
) -> None:
    """Print stored scores: originals against averages, step by step; or log them to a tracker (--export)."""
    from ..api import result_rows
    from ..report.tables import tidy, wide_table

    opt.choice(fmt, FORMATS, "--format")
    if export is not None:
        return _export(store, *export, force=force)
    if force:
        raise fail("--force goes with --export")
    rows = result_rows(store, model=model, task=task, metric=metric, failed=failed)
    if failed:
        for r in rows:
            out.print(f"{r.model} {r.tag} step{r.step} {r.task}: {r.error}", highlight=False, soft_wrap=True)
        say(f"{len(rows)} failed checkpoint x task pair(s)")
        return
    if not rows:
        raise fail(f"{store}: no results" + (" matching the filters" if model or task or metric else ""))
    _warn_mixed(rows)
    if fmt == "table":
        print_wide(wide_table(rows, metric))
    else:
        print_records(tidy(rows), fmt, "")


def _export(store: Path, kind: str, target: str, *, force: bool) -> None:
    from ..api import export_scores
    from ..report.tracking import KINDS, Tracking

    opt.choice(kind, KINDS, "--export")
    tracking = Tracking(**{kind: Path(target) if kind == "tensorboard" else target})
    say(f"{export_scores(store, tracking, force=force)} score(s) logged to {kind} {target}")


def _warn_mixed(rows) -> None:
    """A curve whose points were scored with different settings is flagged, never silently drawn or shown."""
    from ..report.tables import mixed_settings

    for line in mixed_settings(rows):
        say(f"[bold yellow]warning:[/] {line}: its points are not comparable")


def print_wide(table) -> None:
    """The wide layout, one table per task: rows model and step, a column per run. What every row or every
    run shares (a trajectory's prefix, the runs' `-k5-nu50`) is said once in the title, and a run's name is
    broken at its first `-`, so that the table reads at 80 columns; wider than the console, a task's runs
    go into several tables."""
    from rich.table import Table

    from ..report.tables import ORIGINAL, shared_affixes, shortened

    models = [m for m, _, _ in table.rows]
    model_prefix, model_suffix = shared_affixes(models)
    for task in dict.fromkeys(c.task for c in table.columns):
        cols = [(i, c) for i, c in enumerate(table.columns) if c.task == task]
        runs = [c.tag for _, c in cols if c.tag != ORIGINAL]
        run_prefix, run_suffix = shared_affixes(runs)
        metric, better = cols[0][1].metric, cols[0][1].higher_is_better
        title = f"{task}: {metric}" + ("" if better is None else f" ({'higher' if better else 'lower'} is better)")
        shared = [f"trajectories {model_prefix}*{model_suffix}"] if model_prefix or model_suffix else []
        shared += [f"runs {run_prefix}*{run_suffix}"] if run_prefix or run_suffix else []
        if shared:
            title += "; " + ", ".join(shared)
        model_width = max((len(shortened(m, model_prefix, model_suffix)) for m in models), default=5)
        room = max(out.width - model_width - 6 - 4, 12)
        for part in _fitting(cols, room, run_prefix, run_suffix):
            t = Table(title=title, title_justify="left")
            t.add_column("model", no_wrap=True)
            t.add_column("step", justify="right")
            for _, c in part:
                t.add_column(_header(c.tag, run_prefix, run_suffix), justify="right")
            for model, step, values in table.rows:
                cells = ["-" if values[i] is None else f"{values[i]:#.4g}" for i, _ in part]
                cells = [f"[bold green]{text}[/]" if table.beats_original(values, i) else text
                         for (i, _), text in zip(part, cells, strict=True)]
                t.add_row(shortened(model, model_prefix, model_suffix), str(step), *cells)
            out.print(t)
    out.print("green: the average beats the original at that step", style="dim")


def _header(tag: str, prefix: str, suffix: str) -> str:
    from ..report.tables import ORIGINAL, shortened

    name = tag if tag == ORIGINAL else shortened(tag, prefix, suffix)
    return name.replace("-", "\n", 1) if len(name) > 8 else name


def _fitting(cols: list, room: int, prefix: str, suffix: str) -> list[list]:
    """The columns in groups that each fit `room` characters (a column: its widest header line, or a value)."""
    groups: list[list] = [[]]
    width = 0
    for col in cols:
        need = max(6, *(len(line) for line in _header(col[1].tag, prefix, suffix).split("\n"))) + 3
        if groups[-1] and width + need > room:
            groups.append([])
            width = 0
        groups[-1].append(col)
        width += need
    return groups


@app.command()
@user_errors
def plot(
    store: Path = STORE_ARG,
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
    from ..api import plot as draw
    from ..api import result_rows

    wanted = tuple(w.strip() for w in (compare or "").split(",") if w.strip())
    _warn_mixed(result_rows(store, model=model, task=task, metric=metric))
    path = draw(store, task, out_file, metric=metric, model=model, compare=wanted, original=original, title=title)
    say(f"wrote {path}")


@app.command()
@user_errors
def savings(
    store: Path = STORE_ARG,
    model: str = typer.Option(..., help="Comma-separated trajectories as stored (e.g. pythia-6.9b-deduped, or a "
                              "Pythia size such as 6.9b)."),
    task: str = typer.Option(..., help="The task, e.g. pile-philpapers."),
    metric: Optional[str] = typer.Option(None, help="The metric (default: word_perplexity for perplexity tasks, "
                                         "acc for the others); whether higher is better comes from lm-eval."),
    tag: Optional[str] = typer.Option(None, help="The averaging run to credit, e.g. lawa-k5-nu1000 (needed when "
                                      "the store has several for a model)."),
    tolerance: str = typer.Option("0,0.5,1,2,5", help="Comma-separated tolerances in percent of the original's "
                                  "final value."),
    total_steps: Optional[int] = typer.Option(None, help="Steps of the whole training run (default: Pythia's, "
                                              "143000)."),
    gpu_hours: Optional[float] = typer.Option(None, help="GPU hours of the whole run (default: the published "
                                              "figure for Pythia 1b, 2.8b, 6.9b and 12b)."),
    usd_per_gpu_hour: Optional[float] = typer.Option(None, help="Also show the savings in dollars at this price."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json."),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="Also draw GPU hours saved against tolerance, "
                                             "one line per model."),
) -> None:
    """GPU hours saved by averaging: how much earlier the averaged curve reaches the original's final value."""
    from dataclasses import asdict

    from ..api import savings_table

    opt.choice(fmt, FORMATS, "--format")
    if plot_file is not None:
        opt.image_file(plot_file, "--plot")
    models = [m.strip() for m in model.split(",") if m.strip()]
    chosen, table = savings_table(store, models, task, metric=metric, tag=tag,
                                  tolerances=opt.floats(tolerance, "--tolerance"), total_steps=total_steps,
                                  gpu_hours=gpu_hours, usd_per_gpu_hour=usd_per_gpu_hour)
    runs = ", ".join(dict.fromkeys(r.tag for r in table))
    records = [{k: v for k, v in asdict(r).items() if k != "usd_saved" or usd_per_gpu_hour} for r in table]
    print_records(records, fmt, f"GPU hours of {runs} on {task} ({chosen}): ahead of the original, and saved "
                                f"as the paper counts")
    if plot_file:
        from ..report.plots import plot_savings

        say(f"wrote {plot_savings(table, plot_file)}")


HEADERS = {"tolerance_pct": "tol.", "step_reached": "averaged\nat", "original_reached": "original\nat",
           "steps_ahead": "steps\nahead", "gpu_hours_ahead": "GPU h\nahead", "steps_saved": "steps\nsaved\n(paper)",
           "gpu_hours_saved": "GPU h\nsaved\n(paper)", "usd_saved": "USD\nsaved\n(paper)"}
HIDDEN = ("task", "metric", "tag", "pct_of_training")  # in the title, or in csv and json only


def print_records(records: list[dict], fmt: str, title: str) -> None:
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
    t, short = compact_table(title, trajectories=[r["model"] for r in records])
    records = [r | {"model": short["trajectories"](r["model"])} for r in records]
    cols = [c for c in records[0] if c not in HIDDEN]
    for c in cols:
        t.add_column(HEADERS.get(c, c.replace("_", " ")), justify="left" if c == "model" else "right",
                     no_wrap=c == "model")
    for rec in records:
        t.add_row(*[_cell(c, rec[c]) for c in cols])
    out.print(t)


def _cell(column: str, value) -> str:
    if value is None:
        return "never reached" if column == "step_reached" else "-"
    if column in ("model", "tag"):
        return str(value)
    if column == "tolerance_pct":
        return f"{value:g}%"
    if column in ("step_reached", "original_reached", "steps_ahead", "steps_saved"):
        return f"{value:,.0f}"
    if column == "pct_of_training":
        return f"{value:.1f}%"
    if column in ("gpu_hours_ahead", "gpu_hours_saved", "usd_saved"):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return f"${text}" if column == "usd_saved" else text
    return f"{value:.4g}"
