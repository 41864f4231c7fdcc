"""GPU-hour savings: the pure computation on hand-worked curves, and the command on a results store."""

from __future__ import annotations

import json
import time

import pytest
from conftest import cli

from ckptavg.errors import SavingsError
from ckptavg.report.savings import first_reach, match_model, savings
from ckptavg.report.store import Row, Store

ORIGINAL = [(1000, 20.0), (2000, 15.0), (3000, 12.0), (4000, 10.0)]
AVERAGED = [(1000, 18.0), (2000, 13.0), (3000, 10.0), (4000, 9.5)]


def test_lower_is_better_by_hand():
    got = {s.tolerance: s for s in savings(ORIGINAL, AVERAGED, [0, 10, 50, 100], total_steps=143000, gpu_hours=4830)}
    assert got[0].target == 10.0 and got[0].step == 3000 and got[0].steps_saved == 1000  # exact hit on a point
    assert got[0].gpu_hours == pytest.approx(1000 / 143000 * 4830) and got[0].original_step == 4000
    assert got[50].original_step == pytest.approx(2000)  # the original reaches 15 at 2000 by itself
    assert got[10].step == pytest.approx(2000 + 2 / 3 * 1000)  # 13 -> 10 crosses 11 two thirds of the way
    assert got[10].steps_saved == pytest.approx(4000 - 2666.6667, abs=1e-3)
    assert got[50].step == pytest.approx(1600)  # 18 -> 13 crosses 15 at three fifths
    assert got[100].step == 1000 and got[100].fraction == pytest.approx(3000 / 143000)  # reached at the first point
    # the fair credit: ahead of where the original itself gets (at 0% the same as the paper's figure)
    assert got[0].steps_ahead == got[0].steps_saved == 1000
    assert got[50].steps_ahead == pytest.approx(2000 - 1600) and got[50].steps_saved == pytest.approx(4000 - 1600)
    assert got[50].gpu_hours_ahead == pytest.approx(400 / 143000 * 4830)
    assert got[100].steps_ahead == 0  # both curves start at or below 40: averaging gets no credit


def test_never_reached_and_dollars():
    (s,) = savings(ORIGINAL, [(1000, 30.0), (4000, 10.5)], [0], total_steps=143000, gpu_hours=4830)
    assert s.step is None and s.gpu_hours is None
    (s,) = savings(ORIGINAL, AVERAGED, [0], total_steps=4000, gpu_hours=100, usd_per_gpu_hour=2.0)
    assert s.gpu_hours == 25.0 and s.usd == 50.0


def test_averaged_points_after_the_last_original_step_do_not_count():
    (s,) = savings(ORIGINAL, [(3000, 11.0), (4000, 10.5), (5000, 9.0)], [0], total_steps=10, gpu_hours=1)
    assert s.step is None


def test_higher_is_better_by_hand():
    orig, avg = [(1000, 0.3), (2000, 0.5)], [(1000, 0.4), (2000, 0.55)]
    got = {s.tolerance: s for s in savings(orig, avg, [0, 20], total_steps=2000, gpu_hours=10, higher_is_better=True)}
    assert got[0].step == pytest.approx(1000 + (0.5 - 0.4) / (0.55 - 0.4) * 1000)
    assert got[20].target == pytest.approx(0.4) and got[20].step == 1000 and got[20].gpu_hours == pytest.approx(5.0)
    assert first_reach([(0, 0.1), (10, 0.2)], 0.3, higher_is_better=True) is None


def test_errors():
    with pytest.raises(SavingsError, match="at least two evaluated steps"):
        savings(ORIGINAL[:1], AVERAGED, [0], total_steps=1, gpu_hours=1)
    with pytest.raises(SavingsError, match="ambiguous"):
        match_model("1b", ["pythia-1b", "pythia-1b-deduped"])
    assert match_model("1b", ["pythia-1b-deduped", "pythia-2.8b"]) == "pythia-1b-deduped"


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "r.sqlite"
    rows = []
    for model in ("pythia-1b-deduped", "tiny-run"):
        for tag, curve in (("original", ORIGINAL), ("lawa-k5-nu1000", AVERAGED)):
            for step, value in curve:
                rows.append(Row(model, tag, tag.split("-")[0], None, None, step, "pile-enron", "word_perplexity",
                                value, None, False, 0, "ok", "", "0.4.13", "/x", time.time()))
    with Store(path) as db:
        db.put(rows)
    return path


def test_savings_command(store, tmp_path):
    r = cli("savings", str(store), "--model", "1b", "--task", "pile-enron", "--tolerance", "0,10",
                            "--format", "json", "--usd-per-gpu-hour", "2")
    assert r.exit_code == 0, r.output
    recs = json.loads(r.output)
    assert [rec["steps_saved"] for rec in recs] == [1000, pytest.approx(1333.33, abs=0.01)]
    assert recs[0]["gpu_hours_saved"] == pytest.approx(1000 / 143000 * 4830) and recs[0]["model"] == "pythia-1b-deduped"
    assert recs[0]["usd_saved"] == pytest.approx(2 * 1000 / 143000 * 4830)
    png = tmp_path / "s.png"
    r = cli("savings", str(store), "--model", "1b,tiny-run", "--gpu-hours", "100", "--task",
                            "pile-enron", "--tolerance", "0,10,100", "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "tiny-run" in r.output and "pythia-1b-deduped" in r.output and "never reached" not in r.output
    r = cli("savings", str(store), "--model", "1b", "--task", "pile-enron", "--tolerance", "0,10",
                            "--format", "csv")
    assert r.output.splitlines()[1].startswith("pythia-1b-deduped,lawa-k5-nu1000,pile-enron,word_perplexity,0.0,10.0,"
                                               "3000.0,4000.0,1000.0")
    # the original's own 12 -> 10 crosses 11 halfway, at 3500
    assert [rec["steps_ahead"] for rec in recs] == [1000, pytest.approx(3500 - 2666.67, abs=0.01)]


@pytest.mark.parametrize("args, message", [
    (("--model", "tiny-run", "--task", "pile-enron"), "tiny-run: no published GPU hours; give --gpu-hours"),
    (("--model", "1b", "--task", "sciq"), "no results for task 'sciq'"),
    (("--model", "1b", "--task", "pile-enron", "--metric", "acc"), "no 'acc' results"),
    (("--model", "1b", "--task", "pile-enron", "--tolerance", "x"), "--tolerance must be comma-separated numbers"),
    (("--model", "7b", "--task", "pile-enron"), "no results for model '7b'"),
])
def test_savings_errors(store, args, message):
    r = cli("savings", str(store), *args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())
