"""Which checkpoints `ckptavg eval` scores, and the loop that scores them into the results store.

The averaged checkpoints are the finished outputs (those with a manifest) at any depth under a folder;
the original at the same step is the newest input of its window, found from the manifest: a
local folder, or a Hub revision that is fetched for scoring and deleted again afterwards
(when ckptavg downloaded it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InputError
from .results import ORIGINAL, Row, Store, failed_row
from .writer import MANIFEST, read_manifest


@dataclass(frozen=True)
class Target:
    """One checkpoint to score."""

    model: str
    tag: str
    method: str
    k: int | None
    nu: int | None
    step: int
    folder: Path  # where it is, or will be once fetched
    repo: str | None = None  # Hub repo to fetch it from when `folder` is missing
    revision: str | None = None
    pattern: str | None = None
    fetch_bytes: int = 0


def finished_outputs(root: Path) -> Iterator[tuple[Path, dict]]:
    """Every finished output (a folder with a manifest) at any depth under `root`, with its manifest.

    Hidden folders (temporary outputs of unfinished runs) are not entered, nor are outputs."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if MANIFEST in files:
            dirs.clear()
            manifest = read_manifest(Path(folder))
            if manifest is not None:
                yield Path(folder), manifest


def _identity(folder: Path, manifest: dict) -> tuple[str, str]:
    """(model, run tag) from the manifest; outputs written before manifests said so are identified
    by their place in the layout, OUT/MODEL/TAG/stepN."""
    run = manifest.get("run") or {}
    if "model" in run and "tag" in run:
        return run["model"], run["tag"]
    return folder.parent.parent.name, folder.parent.name


def find_targets(run_dir: Path, steps: set[int] | None = None, originals: bool = True) -> list[Target]:
    """Trajectory outputs at any depth under `run_dir` and (with `originals`) the original checkpoint
    of each of their steps."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such folder")
    targets: dict[tuple[str, str, int], Target] = {}
    for folder, manifest in finished_outputs(run_dir):
        method = manifest.get("method") or {}
        if "step" not in method:
            continue  # `ckptavg average` and `interpolate` outputs: no place on a trajectory
        step = int(method["step"])
        if steps is not None and step not in steps:
            continue
        model, tag = _identity(folder, manifest)
        targets[(model, tag, step)] = Target(model, tag, method.get("name", tag), method.get("k"), method.get("nu"),
                                             step, folder)
        if originals and (model, ORIGINAL, step) not in targets:
            targets[(model, ORIGINAL, step)] = _original(model, step, manifest["inputs"])
    if not targets and steps is None:
        raise InputError(f"{run_dir}: no finished trajectory outputs (stepN/{MANIFEST}) at any depth")
    if steps is not None:
        missing = sorted(steps - {t.step for t in targets.values()})
        if missing:
            raise InputError(f"{run_dir}: no finished output for step(s) {', '.join(map(str, missing))}")
    return sorted(targets.values(), key=lambda t: (t.model, t.step, t.tag != ORIGINAL, t.tag))


def _original(model: str, step: int, inputs: list[dict]) -> Target:
    newest = next((i for i in inputs if i.get("step") == step), inputs[-1])
    folder = Path(newest["path"])
    target = Target(model, ORIGINAL, ORIGINAL, None, None, step, folder)
    if newest.get("repo") and not _complete(folder, newest):
        target = replace(target, repo=newest["repo"], revision=newest.get("revision"), pattern=newest.get("pattern"),
                         fetch_bytes=sum(f.get("size", 0) for f in newest.get("files", [])))
    return target


def _complete(folder: Path, described: dict) -> bool:
    return all((folder / f["name"]).is_file() for f in described.get("files", [])) and (folder / "config.json").is_file()


def fetch_bytes(targets: Sequence[Target]) -> int:
    return sum(t.fetch_bytes for t in targets if t.repo)


@contextmanager
def _fetched(target: Target, sources: dict, bars) -> Iterator[Path]:
    """Put a Hub original on disk for scoring and take it away again. `sources` keeps one listed
    HubTrajectory per repo, so a study lists each repo's branches once, not once per original."""
    from .hub import HubTrajectory
    from .sources import DEFAULT_STEP_PATTERN

    # the Hub cache the run used: the manifest's path is CACHE/models--ORG--NAME/snapshots/COMMIT
    cache = target.folder.parents[2] if target.folder.parent.name == "snapshots" else None
    key = (target.repo, target.pattern, cache)
    if key not in sources:
        sources[key] = HubTrajectory(target.repo, target.pattern or DEFAULT_STEP_PATTERN, cache_dir=cache, bars=bars)
    source = sources[key]
    steps = {b: s for s, b in source.branches.items()}
    if target.revision not in steps:
        raise InputError(f"{target.repo}: revision {target.revision} is gone")
    try:
        yield source.fetch(steps[target.revision])
    finally:
        source.evict(steps[target.revision])


class Scorer:
    """Scores checkpoints into the store: skips what is there (unless `force`), records failures,
    and reports each (checkpoint, task) pair to `on_task` as "skipped", "done" or "failed: why"."""

    def __init__(self, tasks: Sequence[str], store: Store, manager, *, device: str, dtype: str, batch_size: str,
                 limit: int | None, force: bool, on_task: Callable[[Target, str, str], None] | None = None) -> None:
        from .evaluate import lm_eval_version

        self.tasks, self.store, self.manager = list(tasks), store, manager
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.limit, self.force = limit, force
        self.report = on_task or (lambda *a: None)
        self.version = lm_eval_version()
        self.scored = self.failed = 0

    def todo(self, target: Target) -> list[str]:
        return [t for t in self.tasks if self.force or not self.store.done(target.model, target.tag, target.step, t,
                                                                            self.limit or 0)]

    def score(self, target: Target, folder: Path, state_dict: dict | None = None) -> None:
        """Score a checkpoint folder, or (`state_dict`) weights in memory with `folder`'s config and tokenizer."""
        from .evaluate import load_model, score

        todo = self.todo(target)
        for t in self.tasks:
            if t not in todo:
                self.report(target, t, "skipped")
        if not todo:
            return
        try:
            lm = load_model(folder, self.device, self.dtype, self.batch_size, state_dict=state_dict)
        except Exception as e:  # a checkpoint that does not load fails its tasks, not the study
            message = f"loading {folder} failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            for task in todo:
                self._record(target, task, message, [], folder)
            return
        where = "(in memory)" if state_dict is not None else str(folder)
        for outcome in score(lm, todo, self.manager, self.limit):
            now = time.time()
            rows = [Row(target.model, target.tag, target.method, target.k, target.nu, target.step, outcome.task,
                        s.metric, s.value, s.stderr, s.higher_is_better, self.limit or 0, "ok", "", self.version,
                        where, now) for s in outcome.scores]
            self._record(target, outcome.task, outcome.error or ("" if rows else "lm-eval returned no numeric metric"),
                         rows, folder)

    def _record(self, target: Target, task: str, error: str, rows: list[Row], folder: Path) -> None:
        self.store.put(rows or [failed_row(target.model, target.tag, target.method, target.k, target.nu, target.step,
                                           task, self.limit or 0, error, self.version, str(folder))])
        self.scored += not error
        self.failed += bool(error)
        self.report(target, task, f"failed: {error}" if error else "done")


def run_eval(targets: Sequence[Target], scorer: Scorer, bars=None) -> None:
    """Score every target; Hub originals no longer on disk are fetched for it and deleted after."""
    sources: dict = {}
    for target in targets:
        if target.repo and scorer.todo(target):
            with _fetched(target, sources, bars) as folder:
                scorer.score(target, folder)
        else:  # on disk, or fully scored already (score() then only reports the skips)
            scorer.score(target, target.folder)


def study_hooks(model: str, spec, outputs: set[int], scorer: Scorer, *, originals: bool, in_memory: bool,
                device: str, out_dtype, copy: Sequence[str] = ()) -> dict:
    """`execute_run` hooks for a study that scores as it goes: each original is scored while it is
    on disk for averaging (no second download), and with `in_memory` each average is made in
    memory and scored instead of written."""
    hooks: dict = {}
    if originals:
        def on_fetch(step: int, folder: Path) -> None:
            if step in outputs:
                scorer.score(Target(model, ORIGINAL, ORIGINAL, None, None, step, folder), folder)

        hooks["on_fetch"] = on_fetch
    if in_memory:
        from .average import average_in_memory

        def average_and_score(window, folders: list[Path]) -> None:
            weights = average_in_memory(folders, weights=window.weights, normalize=False, device=device,
                                        out_dtype=out_dtype, copy=copy)
            target = Target(model, spec.tag(), spec.method, spec.k, spec.nu, window.step, folders[-1])
            scorer.score(target, folders[-1], state_dict=weights)

        hooks["in_memory"] = average_and_score
    return hooks
