"""Scores as curves where researchers look: TensorBoard event files, MLflow, Weights & Biases.

Each trajectory (a results row's `model`) is one run of the tracker (a TensorBoard run folder, an
MLflow run, a W&B run) and each averaging run tag x task x metric one series against training step:
`eval/lawa-k5-nu1000/lambada_openai/acc`, `eval/original/...` beside it. Scores made with `--limit`
go to `eval-limitN/...`, so that they are never drawn as one curve with full scores.

A score goes to each tracker once. The results store keeps a ledger of what went where
(`Store.claim_for`), claimed in the transaction that reads it: a follower restarted, `results
--export` run again, or two processes exporting at once never log a point twice; a re-scored point
(`eval --force`) is logged again. Trackers are optional extras (`ckptavg[tensorboard]`, `[mlflow]`,
`[wandb]`), imported only when one is asked for; the rest of ckptavg never imports them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit, urlunsplit

from ..errors import InputError, IOFailure, OptionError
from ..trajectory.events import Events
from .store import Row, Store

KINDS = ("tensorboard", "mlflow", "wandb")  # each one's package and ckptavg's extra have its name
STEP_SERIES = "ckptavg/step"  # W&B: the x axis every eval/ series is drawn against


class Point(NamedTuple):
    series: str
    step: int
    value: float
    time: float  # when it was scored (seconds since the epoch)


def series(row: Row) -> str:
    prefix = "eval" if not row.limit else f"eval-limit{row.limit}"
    return f"{prefix}/{row.tag}/{row.task}/{row.metric}"


_USERINFO = re.compile(r"(\w[\w+.-]*://)[^/\s@]+@")


def redacted(uri: str) -> str:
    """A URI without the user and password it may carry: what the ledger and every message name."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


class Tracker(Protocol):
    key: str  # the ledger's name for where the points go (no credential in it)

    def log(self, model: str, points: Sequence[Point]) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Tracking:
    """Where scores are logged as they are stored; from `--tensorboard/--mlflow/--wandb` or a study's
    `[tracking]` table. MLflow's experiment and W&B's entity and mode default to the trackers' own
    settings (MLFLOW_EXPERIMENT_NAME, else "ckptavg"; WANDB_ENTITY, WANDB_MODE)."""

    tensorboard: Path | None = None  # a log folder: one run folder per trajectory under it
    mlflow: str | None = None  # a tracking URI: http(s)://..., sqlite:///..., databricks
    mlflow_experiment: str | None = None
    wandb: str | None = None  # a project
    wandb_entity: str | None = None
    wandb_mode: str | None = None  # online | offline

    def __bool__(self) -> bool:
        return any(getattr(self, k) is not None for k in KINDS)

    def checked(self) -> Tracking:
        """Each tracker's package is there (a one-line error naming the extra otherwise), before any work."""
        for kind in KINDS:
            if getattr(self, kind) is not None and not _installed(kind):
                raise OptionError(f"--{kind} needs the {kind} package: pip install 'ckptavg[{kind}]'")
        if self.wandb_mode not in (None, "online", "offline"):
            raise OptionError(f"wandb_mode: {self.wandb_mode!r} is neither online nor offline")
        if self.mlflow is not None and not self.mlflow.strip():
            raise OptionError("--mlflow: an empty tracking URI")
        return self

    def open(self) -> list[Tracker]:
        trackers: list[Tracker] = []
        if self.tensorboard is not None:
            trackers.append(TensorBoard(Path(self.tensorboard)))
        if self.mlflow is not None:
            trackers.append(MLflow(self.mlflow, self.mlflow_experiment))
        if self.wandb is not None:
            trackers.append(WandB(self.wandb, self.wandb_entity, self.wandb_mode))
        return trackers


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules as None: importing it is refused
        return False


def tracking_from(table: dict) -> Tracking:
    """A study file's `[tracking]` table, its keys checked."""
    names = {f.name for f in fields(Tracking)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise OptionError(f"[tracking]: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return Tracking(**table)


@contextmanager
def opened(tracking: Tracking) -> Iterator[list[Tracker]]:
    trackers = tracking.open()
    try:
        yield trackers
    finally:
        for t in trackers:
            t.close()


class LogScores(Events):
    """A run's listener that sends each score to the trackers as it is stored, with any stored score they
    have not had yet (a store scored before the trackers were asked for)."""

    def __init__(self, store: Store, trackers: Sequence[Tracker]) -> None:
        self.store, self.trackers, self.logged = store, trackers, 0

    def scored(self, target, task: str, status: str, rows) -> None:
        if status == "done":
            self.logged += export(self.store, self.trackers)


@contextmanager
def logging_scores(tracking: Tracking, results: Path) -> Iterator[LogScores]:
    """`LogScores` for the length of a run; what is still unsent is sent as it ends."""
    with opened(tracking) as trackers, Store(results) as store:
        listener = LogScores(store, trackers)
        yield listener
        listener.logged += export(store, trackers)


def export(store: Store, trackers: Sequence[Tracker], *, force: bool = False) -> int:
    """Log every stored score a tracker has not had yet (with `force`: every score) to each of `trackers`.
    Returns the points logged, all trackers together. A tracker that fails gives back its claim, so that
    the next export logs what it could not."""
    logged = 0
    for tracker in trackers:
        rows = store.claim_for(tracker.key, force=force)
        try:
            by_model: dict[str, list[Point]] = {}
            for r in rows:
                by_model.setdefault(r.model, []).append(Point(series(r), r.step, float(r.value), r.time))
            for model, points in by_model.items():
                tracker.log(model, points)
        except Exception as e:
            store.unclaim(tracker.key, rows)
            if isinstance(e, InputError | IOFailure | OptionError):
                raise
            said = _USERINFO.sub(r"\1", (str(e).splitlines() or [""])[0])  # a client may quote the URI whole
            raise IOFailure(f"{tracker.key}: logging scores failed ({type(e).__name__}: {said})") from None
        logged += len(rows)
    return logged


# -- the trackers -----------------------------------------------------------------------------------
class TensorBoard:
    """Event files under DIR/TRAJECTORY/, written with TensorBoard's own summary writer (no TensorFlow,
    no torch)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = f"tensorboard:{folder.absolute()}"
        self.writers: dict = {}

    def log(self, model: str, points: Sequence[Point]) -> None:
        from tensorboard.summary import Writer

        if model not in self.writers:
            self.writers[model] = Writer(str(self.folder / model))
        w = self.writers[model]
        for p in points:
            w.add_scalar(p.series, p.value, step=p.step, wall_time=p.time)
        w.flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


_MLFLOW_BAD = re.compile(r"[^\w\-. /:]")  # what MLflow allows in a metric name


class MLflow:
    """One MLflow run per trajectory (tagged `ckptavg.trajectory`, found again by that tag) in one
    experiment, through `MlflowClient`: any tracking URI MLflow takes."""

    TAG = "ckptavg.trajectory"

    def __init__(self, uri: str, experiment: str | None) -> None:
        import logging
        import os

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..."

        self.experiment_name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ckptavg"
        self.key = f"mlflow:{redacted(uri)}#{self.experiment_name}"
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id: str | None = None
        self.runs: dict[str, str] = {}

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        if self.experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                try:
                    self.experiment_id = self.client.create_experiment(self.experiment_name)
                except MlflowException:  # made meanwhile by another process
                    found = self.client.get_experiment_by_name(self.experiment_name)
                    if found is None:
                        raise
            self.experiment_id = self.experiment_id or found.experiment_id
        return self.experiment_id

    def _run(self, model: str) -> str:
        if model not in self.runs:
            eid = self._experiment()
            found = self.client.search_runs([eid], filter_string=f"tags.`{self.TAG}` = '{model}'", max_results=1,
                                            order_by=["attributes.start_time ASC"])
            run = found[0] if found else self.client.create_run(eid, run_name=model, tags={self.TAG: model})
            self.runs[model] = run.info.run_id
        return self.runs[model]

    def log(self, model: str, points: Sequence[Point]) -> None:
        from mlflow.entities import Metric

        run = self._run(model)
        metrics = [Metric(_MLFLOW_BAD.sub("_", p.series), p.value, int(p.time * 1000), p.step) for p in points]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(run, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        for run in self.runs.values():
            self.client.set_terminated(run)
        self.runs.clear()


class WandB:
    """One W&B run per trajectory in a project, its id derived from the trajectory's name, so that every
    export (and every offline run, once synced) adds to the same run; series drawn against
    `ckptavg/step` (W&B's own step must only grow, and scores arrive out of step order)."""

    def __init__(self, project: str, entity: str | None, mode: str | None) -> None:
        import os

        self.project, self.entity, self.mode = project, entity or os.environ.get("WANDB_ENTITY"), mode
        self.key = f"wandb:{self.entity + '/' if self.entity else ''}{project}"
        self.runs: dict = {}

    @staticmethod
    def run_id(project: str, model: str) -> str:
        return hashlib.sha256(f"{project}/{model}".encode()).hexdigest()[:16]

    def _run(self, model: str):
        import wandb

        if model not in self.runs:
            run = wandb.init(project=self.project, entity=self.entity, name=model, mode=self.mode,
                             id=self.run_id(self.project, model), resume="allow", reinit="create_new",
                             config={"ckptavg_trajectory": model}, settings=wandb.Settings(silent=True))
            run.define_metric(STEP_SERIES)
            run.define_metric("eval*", step_metric=STEP_SERIES)
            self.runs[model] = run
        return self.runs[model]

    def log(self, model: str, points: Sequence[Point]) -> None:
        run = self._run(model)
        by_step: dict[int, dict[str, float]] = {}
        for p in points:
            by_step.setdefault(p.step, {})[p.series] = p.value
        for step in sorted(by_step):
            run.log({STEP_SERIES: step, **by_step[step]})

    def close(self) -> None:
        for run in self.runs.values():
            run.finish()
        self.runs.clear()
