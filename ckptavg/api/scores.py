"""Scoring: finished outputs and their originals into the results store, trackers told as scores are stored,
and the diversity of two checkpoints."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from .. import options as opt
from ..checkpoints.layouts import DEFAULT_STEP_PATTERN
from ..errors import OptionError
from ..manifest import is_finished, read_manifest
from ..report.tracking import Tracking
from ..trajectory.events import QUIET, Broadcast, Events
from .settings import Scoring, resolve_device


@contextmanager
def tracked_events(scoring: Scoring | None, events: Events) -> Iterator[tuple[Scoring | None, Events]]:
    """With trackers asked for: the scoring without them and the events with their listener (one
    opened for the whole of a run: a follower's rounds share it)."""
    if scoring is None or not scoring.tracking:
        yield scoring, events
        return
    from ..report.tracking import logging_scores

    with logging_scores(scoring.tracking, scoring.results) as listener:
        yield replace(scoring, tracking=None), Broadcast(events, listener)


def scorer_for(scoring: Scoring, store, device: str, force: bool, events: Events):
    from ..evaluation.scorer import Scorer

    return Scorer(scoring.tasks, store, scoring.registered().manager, device=device, dtype=scoring.dtype,
                  batch_size=scoring.batch_size, limit=scoring.limit, force=force, events=events,
                  resident=not scoring.fresh_model)


# -- scoring a folder of outputs --------------------------------------------------------------------
@dataclass(frozen=True)
class EvalRun:
    targets: tuple
    scored: int = 0
    failed: int = 0


def find_targets(root: str | Path, steps: set[int] | None = None, originals: bool = True) -> list:
    from ..evaluation.targets import find_targets as find

    return find(Path(root), steps, originals)


def fetch_summary(targets: Sequence) -> tuple[int, int, int, int]:
    """(averaged outputs, runs they belong to, originals to fetch from the Hub, bytes to fetch)."""
    from ..evaluation.targets import fetch_bytes
    from ..report.store import ORIGINAL

    averaged = [t for t in targets if t.tag != ORIGINAL]
    return (len(averaged), len({(t.model, t.tag) for t in averaged}), sum(1 for t in targets if t.repo),
            fetch_bytes(targets))


def evaluate(root: str | Path, scoring: Scoring, *, steps: set[int] | None = None, force: bool = False,
             events: Events = QUIET, targets: Sequence | None = None) -> EvalRun:
    """Score every finished output at any depth under `root` (and the originals of their steps) into
    `scoring.results`; what the store has is skipped unless `force`. `targets`, when a caller has found
    them already (`find_targets`), saves walking the outputs and reading their manifests again."""
    from ..evaluation.scorer import run_eval
    from ..report.store import Store

    targets = list(targets) if targets is not None else find_targets(root, steps, scoring.originals)
    device = resolve_device(scoring.device)
    with Store(scoring.results) as store, tracked_events(scoring, events) as (scoring, events):
        scorer = scorer_for(scoring, store, device, force, events)
        run_eval(targets, scorer)
    return EvalRun(tuple(targets), scorer.scored, scorer.failed)


def export_scores(results: str | Path, tracking: Tracking, *, force: bool = False) -> int:
    """Log a results store's scores to trackers (`ckptavg results --export`): those each tracker has not had
    yet, or with `force` every one. Returns the points logged, all trackers together."""
    from ..report.store import open_results
    from ..report.tracking import export, opened

    tracking = tracking.checked()
    with open_results(Path(results)) as store, opened(tracking) as trackers:
        return export(store, trackers, force=force)


# -- checkpoint diversity ---------------------------------------------------------------------------
def diversity(a: str | Path, b: str | Path, text: str | Path, *, device: str = "auto", dtype: str = "auto",
              results: str | Path | None = None, model: str | None = None, step: int | None = None,
              tag: str = "pair", context: int | None = None):
    """How much checkpoints A and B disagree on `text` (`evaluation.diversity.Diversity`): argmax
    disagreement and mean KL(A || B). With `results`, stored as task `diversity:TEXT-NAME` of the run
    `model`/`tag` at `step` (by default B's trajectory and step, from its manifest or its folder's
    name), so that `plot` draws it against step."""
    from ..evaluation.diversity import TASK_PREFIX, measure, read_texts
    from ..evaluation.resident import identity

    a, b = Path(a), Path(b)
    for folder in (a, b):
        if not (folder / "config.json").is_file():
            raise OptionError(f"{folder}: not a model folder (no config.json)")
    texts = read_texts(Path(text))
    dtype = opt.choice(dtype, opt.EVAL_DTYPES, "--dtype")
    model, step = _trajectory_step(b, model, step) if results is not None else (model or "", step or 0)
    if identity(a) != identity(b):
        raise OptionError(f"{a} and {b} differ in config or tokenizer: their predictions are not comparable")
    from ..evaluation.harness import effective_settings, load_model

    dev = resolve_device(device)
    lm_a, lm_b = (load_model(folder, dev, dtype, "1") for folder in (a, b))  # as a fresh model is loaded to score
    found = measure(lm_a.model, lm_b.model, lm_b.tokenizer, texts, context)
    if results is not None:
        _store_diversity(results, model, tag, step, f"{TASK_PREFIX}{Path(text).stem}", found,
                         f"{a} vs {b}", effective_settings(dev, dtype, "1")[1], dev)
    return found


def _trajectory_step(folder: Path, model: str | None, step: int | None) -> tuple[str, int]:
    """(trajectory, step) of a checkpoint: given, or from its manifest's run, or its folder's names."""
    from ..trajectory.sources import step_branches

    manifest = read_manifest(folder) if is_finished(folder) else None
    model = model or (manifest.run.model if manifest and manifest.run else folder.parent.name)
    if step is None:
        found = step_branches([folder.name], DEFAULT_STEP_PATTERN, str(folder))
        if not found:
            raise OptionError(f"{folder}: no step in its name; give --step")
        step = next(iter(found))
    return model, step


def _store_diversity(results, model: str, tag: str, step: int, task: str, found, where: str, dtype: str,
                     device: str) -> None:
    from ..evaluation.diversity import rows
    from ..report.store import Store

    with Store(Path(results)) as store:
        store.put(rows(found, model, tag, step, task, where, dtype, device))
