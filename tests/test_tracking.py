"""Scores sent to trackers (`ckptavg results --export`, and as a run stores them), read back with the trackers'
own libraries: TensorBoard's event accumulator, `MlflowClient` on a local SQLite store, and a W&B offline
run's transaction log parsed with wandb's protobuf. Each stored score arrives once, at its step, whatever
runs again or at once; a failed tracker gets the scores on the next export; credentials go nowhere.

The scores here are stored rows made up for the purpose (what is tested is their way out, not lm-eval);
`test_eval.py` has a run that scores and logs as it goes."""

from __future__ import annotations

import multiprocessing
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_user_error, cli

from ckptavg import api
from ckptavg.report.store import Row, Store
from ckptavg.report.tracking import Tracking

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def scores(model: str = "tiny-run", when: float | None = None) -> list[Row]:
    rows = []
    for tag, method, k in (("original", "original", None), ("lawa-k2-nu100", "lawa", 2)):
        for step in (300, 100, 200):  # stored out of step order, as a run stores them
            for task, metric, value in (("pile-enron", "word_perplexity", 1000.0 / step + (k or 0)),
                                        ("tinymc", "acc", step / 1000)):
                rows.append(Row(model, tag, method, k, 100 if k else None, step, task, metric, value, None,
                                metric == "acc", 0, "ok", "", "0.4", "x", when or time.time()))
    rows.append(Row(model, "original", "original", None, None, 400, "tinymc", "", None, None, None, 0, "failed",
                    "boom", "0.4", "x", time.time()))  # a failed row is never sent
    return rows


def expected(rows: list[Row]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(trajectory, series) -> sorted [(step, value)]"""
    out: dict = {}
    for r in rows:
        if r.status == "ok":
            out.setdefault((r.model, f"eval/{r.tag}/{r.task}/{r.metric}"), []).append((r.step, r.value))
    return {k: sorted(v) for k, v in out.items()}


def tensorboard_series(folder: Path) -> dict:
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    got = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(run))
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            got[(run.name, tag)] = sorted((e.step, float(make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag))
    return got


def mlflow_series(uri: str, experiment: str = "ckptavg") -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    got = {}
    for run in client.search_runs([exp.experiment_id]):
        for key in run.data.metrics:
            got[(run.info.run_name, key)] = sorted((m.step, m.value) for m in client.get_metric_history(
                run.info.run_id, key))
    return got


def approx(series: dict) -> dict:
    """TensorBoard stores float32: the values as float32."""
    import numpy

    return {k: [(s, float(numpy.float32(v))) for s, v in pts] for k, pts in series.items()}


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "results.sqlite"
    with Store(path) as s:
        s.put(scores())
    return path


def test_export_sends_each_score_once_to_each_tracker(store, tmp_path):
    tb, ml = tmp_path / "tb", f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Store(store) as s:
        rows = s.rows()
    want = expected(rows)
    r = cli("results", store, "--export", "tensorboard", tb)
    assert r.exit_code == 0 and f"{len(rows)} score(s) logged" in r.output, r.output
    r = cli("results", store, "--export", "mlflow", ml)
    assert r.exit_code == 0 and f"{len(rows)} score(s) logged" in r.output, r.output
    assert approx(tensorboard_series(tb)) == approx(want)
    assert mlflow_series(ml) == want

    # again: nothing new, nothing logged twice
    for kind, target in (("tensorboard", tb), ("mlflow", ml)):
        r = cli("results", store, "--export", kind, target)
        assert r.exit_code == 0 and "0 score(s) logged" in r.output, r.output
    assert approx(tensorboard_series(tb)) == approx(want) and mlflow_series(ml) == want

    # a score stored again (re-scored) is sent again; the others are not
    with Store(store) as s:
        again = next(r for r in s.rows() if r.step == 200 and r.tag == "original" and r.task == "tinymc")
        s.put([Row(**{**again.__dict__, "value": 0.9, "time": time.time() + 1})])
    r = cli("results", store, "--export", "mlflow", ml)
    assert r.exit_code == 0 and "1 score(s) logged" in r.output, r.output
    assert mlflow_series(ml)[("tiny-run", "eval/original/tinymc/acc")] == [(100, 0.1), (200, 0.2), (200, 0.9),
                                                                          (300, 0.3)]
    # --force sends every score again
    r = cli("results", store, "--export", "tensorboard", tb, "--force")
    assert r.exit_code == 0 and f"{len(rows)} score(s) logged" in r.output, r.output
    assert all(len(v) == 2 * len(want[k]) for k, v in tensorboard_series(tb).items())


def _export(store: str, folder: str, uri: str, start: float) -> int:
    while time.time() < start:  # both processes claim at once
        time.sleep(0.001)
    return api.export_scores(store, Tracking(tensorboard=Path(folder), mlflow=uri))


def test_two_processes_exporting_at_once_send_each_score_once(store, tmp_path):
    tb, ml = tmp_path / "tb", f"sqlite:///{tmp_path / 'mlflow.db'}"
    api.export_scores(store, Tracking(mlflow=ml))  # (MLflow makes its tables once, before the race)
    with Store(store) as s:
        s.db.execute("DELETE FROM exported")
        want = expected(s.rows())
    start = time.time() + 3
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        sent = pool.starmap(_export, [(str(store), str(tb), ml, start)] * 2)
    assert sum(sent) == 2 * sum(len(v) for v in want.values())  # every score, once per tracker, in all
    assert approx(tensorboard_series(tb)) == approx(want)
    assert mlflow_series(ml) == want


def test_a_tracker_that_fails_gets_its_scores_on_the_next_export(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = "http://alice:s3cret-token@127.0.0.1:9"  # nothing listens there; the password must go nowhere
    r = cli("results", store, "--export", "mlflow", down)
    assert r.exit_code == 3 and "error: mlflow:http://127.0.0.1:9#ckptavg: logging scores failed" in r.output
    assert "s3cret" not in r.output and "alice" not in r.output and "Traceback" not in r.output, r.output
    ledger = sqlite3.connect(store).execute("SELECT DISTINCT tracker FROM exported").fetchall()
    assert "s3cret" not in str(ledger)
    assert sqlite3.connect(store).execute("SELECT COUNT(*) FROM exported").fetchone()[0] == 0  # claim given back
    # the same tracker once it answers (here a local store under the same experiment): every score arrives
    ml = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Store(store) as s:
        want = expected(s.rows())
    assert api.export_scores(store, Tracking(mlflow=ml)) == sum(len(v) for v in want.values())
    assert mlflow_series(ml) == want


def test_tracking_settings_are_checked_before_any_work(tmp_path, monkeypatch):
    r = cli("trajectory", tmp_path, "--tensorboard", tmp_path / "tb")
    assert_user_error(r, "--tensorboard log scores: give --eval TASKS")
    r = cli("results", tmp_path / "none.sqlite", "--export", "comet", "x")
    assert_user_error(r, "--export", "comet")
    study = tmp_path / "s.toml"
    study.write_text('[[sources]]\nlocal = "run"\n[steps]\ninterval = 2\n[[runs]]\nmethod = "lawa"\nk = 2\nnu = 1\n'
                     '[tracking]\ntensorboard = "tb"\n')
    r = cli("study", "plan", study, "--root", tmp_path)
    assert_user_error(r, "[tracking] logs scores: give [scoring] tasks")
    study.write_text(study.read_text() + 'tensorbaord = "tb"\n')
    r = cli("study", "plan", study, "--root", tmp_path)
    assert_user_error(r, "[tracking]: unknown key(s) tensorbaord")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    r = cli("results", tmp_path / "none.sqlite", "--export", "wandb", "proj")
    assert_user_error(r, "--wandb needs the wandb package: pip install 'ckptavg[wandb]'")
