"""The pure trajectory planner, against hand-worked examples and the recursive definitions."""

from __future__ import annotations

import math

import pytest

from ckptavg.errors import OptionError, ScheduleError
from ckptavg.trajectory import pythia
from ckptavg.trajectory.schedule import (
    ema_windows,
    lawa_windows,
    plan_fetches,
    sequence,
    steps_of,
    swa_windows,
    weight_sum_ok,
)


def test_lawa_windows_slide_by_interval():
    ws = lawa_windows(k=3, nu=1000, interval=3000, start=21000, end=30000)
    assert [w.step for w in ws] == [21000, 24000, 27000, 30000]
    assert ws[0].members == (19000, 20000, 21000)
    assert ws[-1].members == (28000, 29000, 30000)
    assert all(w.weights == (1 / 3,) * 3 for w in ws)


def test_paper_recipe_on_pythia_steps():
    ws = lawa_windows(k=5, nu=1000, interval=3000, start=21000, end=141000, available=pythia.steps())
    assert len(ws) == 41 and ws[0].members == (17000, 18000, 19000, 20000, 21000)
    assert set(steps_of(ws)) <= set(pythia.steps())


@pytest.mark.parametrize("kw, message", [
    (dict(k=0), "--k"), (dict(nu=0), "--nu"), (dict(interval=-1), "--interval"),
    (dict(start=5000, end=4000), "after --end"), (dict(start=1000, k=5), "raise --start"),
])
def test_invalid_parameters(kw, message):
    args = dict(k=2, nu=1000, interval=1000, start=5000, end=6000) | kw
    with pytest.raises(ScheduleError, match=message):
        lawa_windows(**args)


def test_missing_revision_is_named_unless_skipped():
    have = [s for s in range(0, 20001, 1000) if s != 13000]
    with pytest.raises(ScheduleError, match="window at step 14000 needs step\\(s\\) 13000"):
        lawa_windows(k=2, nu=1000, interval=2000, start=10000, end=20000, available=have)
    ws = lawa_windows(k=2, nu=1000, interval=2000, start=10000, end=20000, available=have, skip_incomplete=True)
    assert 14000 not in [w.step for w in ws] and len(ws) == 5


def recursive_ema(n: int, alpha: float) -> list[float]:
    """e_0 = c_0, e_i = (1-a) e_{i-1} + a c_i, run on coefficient vectors."""
    e = [1.0]
    for _ in range(1, n):
        e = [(1 - alpha) * x for x in e] + [alpha]
    return e


def test_ema_weights_follow_the_recursion():
    ws = ema_windows(k=2, nu=1000, interval=2000, start=10000, end=16000, alpha=0.3, tail=0.0)
    seq = sequence(2, 1000, 2000, 10000, 16000)
    assert seq == [9000, 10000, 11000, 12000, 13000, 14000, 15000, 16000]
    for w in ws:
        members = [s for s in seq if s <= w.step]
        assert w.members == tuple(members)
        assert w.weights == pytest.approx(recursive_ema(len(members), 0.3), rel=1e-12)
        assert weight_sum_ok(w)


def test_ema_tail_is_dropped_and_accounted():
    ws = ema_windows(k=5, nu=1000, interval=3000, start=21000, end=141000, alpha=0.9)
    last = ws[-1]
    assert len(last.members) < 10 and last.members[-1] == 141000
    assert 0 < last.dropped_weight < 1e-6 and weight_sum_ok(last)


def test_swa_is_the_running_uniform_mean():
    ws = swa_windows(k=2, nu=1000, interval=2000, start=10000, end=14000, swa_start=10000)
    assert ws[0].members == (10000,)
    assert ws[1].members == (10000, 11000, 12000) and ws[1].weights == (1 / 3,) * 3
    assert ws[2].members == (10000, 11000, 12000, 13000, 14000)
    with pytest.raises(ScheduleError, match="--swa-start"):
        swa_windows(k=2, nu=1000, interval=2000, start=10000, end=14000, swa_start=20000)


def test_fetch_plan_fetches_each_revision_once_and_evicts_after_last_use():
    ws = lawa_windows(k=3, nu=1000, interval=1000, start=12000, end=15000)
    sizes = {s: 10 for s in steps_of(ws)}
    plan = plan_fetches(ws, sizes, output_bytes=5)
    assert sorted(plan.fetches) == steps_of(ws) and len(plan.fetches) == len(set(plan.fetches))
    kinds = [(a.kind, a.step) for a in plan.actions]
    # 10000 is only in the first window: evicted right after it
    assert kinds.index(("evict", 10000)) == kinds.index(("average", 12000)) + 1
    assert plan.peak_disk == 3 * 10 + 5 and plan.download_bytes == 60
    for i, a in enumerate(plan.actions):  # nothing is used before its fetch or after its eviction
        if a.kind == "average":
            w = next(w for w in ws if w.step == a.step)
            fetched = {b.step for b in plan.actions[:i] if b.kind == "fetch"}
            evicted = {b.step for b in plan.actions[:i] if b.kind == "evict"}
            assert set(w.members) <= fetched - evicted


def test_fetch_plan_respects_disk_budget():
    ws = lawa_windows(k=3, nu=1000, interval=1000, start=12000, end=15000)
    sizes = {s: 10 for s in steps_of(ws)}
    plan_fetches(ws, sizes, output_bytes=5, disk_budget=35)
    with pytest.raises(ScheduleError, match="cannot hold one window: 0.0 GB"):
        plan_fetches(ws, sizes, output_bytes=5, disk_budget=34)
    kept = plan_fetches(ws, sizes, output_bytes=5, keep_downloads=True)
    assert kept.peak_disk == 60 + 5 and not [a for a in kept.actions if a.kind == "evict"]
    with pytest.raises(ScheduleError, match="peaks at"):
        plan_fetches(ws, sizes, output_bytes=5, keep_downloads=True, disk_budget=40)


def test_non_multiple_interval_keeps_revisions_needed_later():
    ws = lawa_windows(k=5, nu=1000, interval=1500, start=21000, end=24000)
    sizes = {s: 1 for s in steps_of(ws)}
    plan = plan_fetches(ws, sizes)
    assert len(plan.fetches) == len(steps_of(ws))


def test_pythia_catalogue():
    assert len(pythia.revisions()) == 154
    assert pythia.revisions()[:3] == ["step0", "step1", "step2"] and pythia.revisions()[-1] == "step143000"
    assert pythia.model("6.9b").repo_id() == "EleutherAI/pythia-6.9b-deduped"
    assert pythia.model("pythia-12B").repo_id(deduped=False) == "EleutherAI/pythia-12b"
    assert math.isclose(pythia.model("1b").gpu_hours, 4830)
    with pytest.raises(OptionError, match="unknown Pythia size"):
        pythia.model("3b")
