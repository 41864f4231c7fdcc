"""Scoring checkpoints into the results store: the loop `ckptavg eval` runs, and the hooks that let a
trajectory run score as it goes (each original while it is on disk, each average once made)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CkptavgWarning
from ..report.store import ORIGINAL, Row, Store, failed_row
from ..trajectory.events import QUIET, Broadcast, Events, byte_bar
from .targets import Target, fetched

if TYPE_CHECKING:
    from ..engine.plan import AveragePlan


class Scorer:
    """Scores checkpoints into the store: skips what is there (unless `force`), records failures,
    and tells `events.scored` of each (checkpoint, task) pair: "skipped", "done" or "failed: why".

    One resident model scores every checkpoint (`resident.py`); `resident=False` builds a fresh model
    for each, as ckptavg did before (the scores are the same)."""

    def __init__(self, tasks: Sequence[str], store: Store, manager, *, device: str, dtype: str, batch_size: str,
                 limit: int | None, force: bool, events: Events = QUIET, resident: bool = True) -> None:
        from .harness import effective_settings, lm_eval_version
        from .resident import ResidentModel

        self.tasks, self.store, self.manager = list(tasks), store, manager
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        # every row records the settings its score was made with: one study scores all its checkpoints alike
        self.settings = dict(zip(("batch_size", "dtype"), effective_settings(device, dtype, batch_size),
                                 strict=True)) | {"device": device}
        self.limit, self.force = limit, force
        self.events = events
        self.version = lm_eval_version()
        self.scored = self.failed = 0
        self.resident = ResidentModel(device, dtype, batch_size) if resident else None

    def todo(self, target: Target) -> list[str]:
        return [t for t in self.tasks if self.force or not self.store.done(target.model, target.tag, target.step, t,
                                                                            self.limit or 0)]

    def score(self, target: Target, folder: Path, average: AveragePlan | None = None) -> None:
        """Score a checkpoint folder, or (`average`) an average made in memory, with `folder`'s config and tokenizer."""
        from .harness import score

        todo = self.todo(target)
        for t in self.tasks:
            if t not in todo:
                self.events.scored(target, t, "skipped", ())
        if not todo:
            return
        try:
            lm = self._model(folder, average)
        except Exception as e:  # a checkpoint that does not load fails its tasks, not the study
            message = f"loading {folder} failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            for task in todo:
                self._record(target, task, message, [], folder)
            return
        where = "(in memory)" if average is not None else str(folder)
        for outcome in score(lm, todo, self.manager, self.limit):
            now = time.time()
            rows = [Row(target.model, target.tag, target.method, target.k, target.nu, target.step, outcome.task,
                        s.metric, s.value, s.stderr, s.higher_is_better, self.limit or 0, "ok", "", self.version,
                        where, now, **self.settings) for s in outcome.scores]
            self._record(target, outcome.task, outcome.error or ("" if rows else "lm-eval returned no numeric metric"),
                         rows, folder)

    def _model(self, folder: Path, average: AveragePlan | None):
        from .harness import load_model
        from .resident import ResidentUnsupported

        if self.resident is not None:
            try:
                return self.resident.lm(folder, average)
            except ResidentUnsupported as e:
                warnings.warn(f"{e}: scoring with a fresh model per checkpoint", CkptavgWarning, stacklevel=2)
                self.resident = None
        weights = None
        if average is not None:
            from ..engine.pipeline import execute_in_memory, resolve_device

            weights = execute_in_memory(average, resolve_device(self.device))
        return load_model(folder, self.device, self.dtype, self.batch_size, state_dict=weights)

    def _record(self, target: Target, task: str, error: str, rows: list[Row], folder: Path) -> None:
        rows = rows or [failed_row(target.model, target.tag, target.method, target.k, target.nu, target.step, task,
                                   self.limit or 0, error, self.version, str(folder))]
        self.store.put(rows)
        self.scored += not error
        self.failed += bool(error)
        self.events.scored(target, task, f"failed: {error}" if error else "done", rows)


def run_eval(targets: Sequence[Target], scorer: Scorer) -> None:
    """Score every target; Hub originals no longer on disk are fetched for it and deleted after."""
    sources: dict = {}
    for target in targets:
        if target.repo and scorer.todo(target):
            with fetched(target, sources, byte_bar(scorer.events)) as folder:
                scorer.score(target, folder)
        else:  # on disk, or fully scored already (score() then only reports the skips)
            scorer.score(target, target.folder)


class PairScorer(Events):
    """The diversity of consecutive window members (`diversity.py`), each pair stored once though
    sliding windows share members: series `nuN` (N the steps between them) at the later step. One
    model of its own and the scorer's resident model hold the pair: two models, never three."""

    def __init__(self, text: Path, scorer: Scorer, model: str) -> None:
        from .diversity import TASK_PREFIX, read_texts
        from .resident import ResidentModel

        self.texts, self.task, self.model, self.scorer = read_texts(text), TASK_PREFIX + text.stem, model, scorer
        self.first = ResidentModel(scorer.device, scorer.dtype, "1")
        self.second = scorer.resident or ResidentModel(scorer.device, scorer.dtype, "1")

    def window_inputs(self, job, folders) -> None:
        from .diversity import measure, rows

        members = job.window.members
        for i in range(len(members) - 1):
            (s0, a), (s1, b) = (members[i], folders[i]), (members[i + 1], folders[i + 1])
            tag = f"nu{s1 - s0}"
            if not self.scorer.force and self.scorer.store.done(self.model, tag, s1, self.task, 0):
                continue
            try:
                lm_a, lm_b = self.first.lm(a), self.second.lm(b)
                found = measure(lm_a.model, lm_b.model, lm_b.tokenizer, self.texts)
                self.scorer.store.put(rows(found, self.model, tag, s1, self.task, f"{a} vs {b}",
                                           self.scorer.settings["dtype"], self.scorer.device))
            except Exception as e:  # like a failed task: recorded, retried next time, the study goes on
                self.scorer.store.put([failed_row(self.model, tag, "diversity", None, None, s1, self.task, 0,
                                                  f"{type(e).__name__}: {e}", self.scorer.version, f"{a} vs {b}")])


class ScoreOriginals(Events):
    """Each original is scored while it is on disk for averaging: no second download."""

    def __init__(self, model: str, outputs: set[int], scorer: Scorer) -> None:
        self.model, self.outputs, self.scorer = model, outputs, scorer

    def fetched(self, step: int, folder: Path) -> None:
        if step in self.outputs:
            self.scorer.score(Target(self.model, ORIGINAL, ORIGINAL, None, None, step, folder), folder)


InMemory = Callable[[object, list[Path], list[int]], None]  # execute_run's `in_memory`: (job, folders, reread)


def study_listeners(model: str, outputs: set[int], scorer: Scorer, *, originals: bool, in_memory: bool,
                    out_dtype, copy: Sequence[str] = (), diversity: Path | None = None
                    ) -> tuple[Events, InMemory | None]:
    """What a study that scores as it goes adds to `execute_run`: the listeners (originals scored while on
    disk, the diversity of window members) and, with `in_memory`, each average made in memory and scored
    instead of written."""
    listeners = Broadcast(ScoreOriginals(model, outputs, scorer) if originals else None,
                          PairScorer(diversity, scorer, model) if diversity is not None else None)
    if not in_memory:
        return listeners, None
    from ..engine.average import plan_in_memory

    def average_and_score(job, folders: list[Path], reread: list[int]) -> None:
        # planned here, so that inputs that do not match end the run as they would when writing
        plan = plan_in_memory(folders, weights=job.window.weights, normalize=False, out_dtype=out_dtype, copy=copy,
                              reread=reread)
        target = Target(job.run.model, job.run.tag, job.spec.method, job.spec.k, job.spec.nu, job.window.step,
                        folders[-1])
        scorer.score(target, folders[-1], average=plan)

    return listeners, average_and_score
