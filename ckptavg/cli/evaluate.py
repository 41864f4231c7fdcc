"""`ckptavg eval`: score every finished output under a folder, and the originals of their steps."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import options as opt
from ..evaluation.harness import DEFAULT_TASKS
from ..units import format_size
from .common import Bars, Tasks, app, grouped, out, say, scoring, user_errors


@app.command("eval")
@user_errors
@grouped(tasks=Tasks)
def eval_(
    run_dir: Path = typer.Argument(..., help="A folder holding finished outputs at any depth: the --out of a "
                                   "trajectory run (OUT), one trajectory (OUT/NAME) or one run (OUT/NAME/METHOD-TAG). "
                                   "Model and run are read from each output's manifest."),
    task_names: str = typer.Option(",".join(DEFAULT_TASKS), "--tasks", help="Comma-separated lm-eval tasks. "
                                   "pile-philpapers, pile-bookcorpus2, pile-youtubesubtitles and pile-enron come from "
                                   "--pile; the others are lm-eval's own tasks."),
    originals: bool = typer.Option(True, "--originals/--no-originals", help="Also score the original checkpoint "
                                   "at each averaged step (fetched from the Hub if it is no longer on disk)."),
    steps: Optional[str] = typer.Option(None, help="Only these steps, comma-separated (default: every finished "
                                        "output)."),
    device: str = typer.Option("auto", help="Where to run the models: auto (cuda if available), cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="Model dtype for scoring: auto (float32 on CPU, as stored on a GPU), "
                              "float16, bfloat16 or float32."),
    force: bool = typer.Option(False, "--force", help="Score again what the store already has."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be scored and fetched, and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    tasks: Tasks = None,
) -> None:
    """Score averaged checkpoints and their originals with lm-evaluation-harness into a results store.

    Each checkpoint x task is one row group in the store; what is already there is skipped, so an
    interrupted study resumes. A task that fails for one checkpoint is stored as failed (and retried
    next time) and the study goes on.
    """
    from ..api import evaluate, fetch_summary, find_targets, resolve_device

    wanted = opt.ints(steps, "--steps") if steps else None
    checked = scoring(task_names, tasks, originals=originals, in_memory=False, register=not dry_run,
                      device=opt.device(device) if dry_run else resolve_device(device), dtype=dtype)
    targets = find_targets(run_dir, wanted, originals)
    outputs, runs, hub, to_fetch = fetch_summary(targets)
    say(f"{outputs} finished output(s) in {runs} run(s) under {run_dir}; {len(targets)} checkpoint(s) x "
        f"{len(checked.tasks)} task(s); originals to fetch from the Hub: {hub} ({format_size(to_fetch)})")
    if dry_run:
        for t in targets:
            where = f"hf://{t.repo}@{t.revision}" if t.repo else t.folder
            out.print(f"{t.model}  {t.tag:<24} step{t.step:<8} {where}", highlight=False, soft_wrap=True)
        return
    with Bars(quiet) as bars:
        result = evaluate(run_dir, checked, steps=wanted, force=force, bars=bars, targets=targets,
                          on_task=bars.scoring(len(targets) * len(checked.tasks)))
    say(f"{result.scored} task score(s) written to {checked.results}, {result.failed} failed")
