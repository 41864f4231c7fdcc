"""`ckptavg eval`: score every finished output under a folder, and the originals of their steps."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import options as opt
from ..errors import OptionError
from ..evaluation.harness import DEFAULT_TASKS
from ..units import format_size
from .console import app, out, say, user_errors
from .groups import Tasks, grouped, scoring
from .progress import Bars


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
    checked = scoring(task_names, tasks, originals=originals, in_memory=False, register=False,
                      device=opt.device(device) if dry_run else resolve_device(device), dtype=dtype)
    targets = find_targets(run_dir, wanted, originals)  # (what is there to score, before the tasks are indexed)
    if not dry_run:
        checked = checked.registered()
    outputs, runs, hub, to_fetch = fetch_summary(targets)
    say(f"{outputs} finished output(s) in {runs} run(s) under {run_dir}; {len(targets)} checkpoint(s) x "
        f"{len(checked.tasks)} task(s); originals to fetch from the Hub: {hub} ({format_size(to_fetch)})")
    if dry_run:
        for t in targets:
            where = f"hf://{t.repo}@{t.revision}" if t.repo else t.folder
            out.print(f"{t.model}  {t.tag:<24} step{t.step:<8} {where}", highlight=False, soft_wrap=True)
        return
    with Bars(quiet) as bars:
        result = evaluate(run_dir, checked, steps=wanted, force=force, targets=targets,
                          events=bars.count_scores(len(targets) * len(checked.tasks)))
    say(f"{result.scored} task score(s) written to {checked.results}, {result.failed} failed")


@app.command("diversity")
@user_errors
def diversity(
    a: Path = typer.Argument(..., help="The first checkpoint folder (A in KL(A || B))."),
    b: Path = typer.Argument(..., help="The second checkpoint folder, with the same config and tokenizer."),
    text: Path = typer.Option(..., "--text", help="The text to predict: a .jsonl file of {\"text\": ...} records, or "
                              "any other file as one text."),
    results: Optional[Path] = typer.Option(None, help="Also store the two numbers in this results store, as task "
                                           "diversity:TEXT-NAME (then `ckptavg plot STORE --task diversity:...`)."),
    model: Optional[str] = typer.Option(None, help="With --results: the trajectory to store it under (default: B's, "
                                        "from its manifest, else B's parent folder name)."),
    step: Optional[int] = typer.Option(None, help="With --results: the step to store it at (default: B's, from "
                                       "its folder name stepN)."),
    tag: str = typer.Option("pair", help="With --results: the series name, e.g. nu1000 for checkpoints 1000 steps "
                            "apart."),
    context: Optional[int] = typer.Option(None, help="Tokens per model input (default: the model's context)."),
    device: str = typer.Option("auto", help="Where to run the models: auto (cuda if available), cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="Model dtype: auto (float32 on CPU, as stored on a GPU), float16, "
                              "bfloat16 or float32."),
) -> None:
    """How much two checkpoints disagree on a text: the fraction of positions whose most likely next
    tokens differ, and the mean KL(A || B) of their next-token distributions (nats). Averaging helps
    where checkpoints disagree (the paper's Sec. 2)."""
    from ..api import diversity as measure

    if context is not None and context < 1:
        raise OptionError(f"--context must be at least 1, got {context}")
    found = measure(a, b, text, device=device, dtype=dtype, results=results, model=model, step=step, tag=tag,
                    context=context)
    out.print(f"argmax disagreement {found.argmax_disagreement:.4f}, mean KL(A || B) {found.kl_nats:.4g} nats "
              f"over {found.positions:,} positions", highlight=False)
    if results is not None:
        say(f"stored in {results}")
