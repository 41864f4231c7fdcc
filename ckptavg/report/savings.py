"""GPU-hour savings: how much earlier the averaged trajectory reaches the original's final quality.

For a tolerance eps (percent) and a lower-is-better metric, the target is (1 + eps/100) times
the original's value at its last evaluated step; for a higher-is-better metric, (1 - eps/100)
times it. The averaged curve reaches the target at a step found by linear interpolation in step
between its evaluated points (an exact hit on an evaluated point is that point's step). Saved
steps are the original's last step minus that step; saved GPU hours are saved steps over the
run's total steps times the run's GPU hours (the paper's definition). Above 0% the original
itself reaches the target before its last step, so the paper's figure then mostly measures the
curve's shape; the fair credit to averaging is how many steps (and GPU hours) ahead of the
original the averaged curve reaches the target, reported beside it (and led with in the plot).
Pure: numbers in, numbers out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import SavingsError

Curve = Sequence[tuple[int, float]]  # (step, value), sorted by step


@dataclass(frozen=True)
class Saving:
    tolerance: float  # percent
    target: float
    step: float | None  # where the averaged curve first reaches the target; None: never (by the last step)
    original_step: float  # where the original curve itself first reaches it (its last step, at 0%)
    steps_saved: float | None  # the paper's: the original's last step minus `step`
    fraction: float | None  # of the whole run's steps
    gpu_hours: float | None
    usd: float | None
    steps_ahead: float | None = None  # the fair credit: `original_step` minus `step` (equal to steps_saved at 0%)
    gpu_hours_ahead: float | None = None


def _reached(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target


def first_reach(curve: Curve, target: float, higher_is_better: bool = False) -> float | None:
    """The first step at which the piecewise-linear curve reaches `target`, or None."""
    for i, (step, value) in enumerate(curve):
        if _reached(value, target, higher_is_better):
            if i == 0 or value == target:
                return float(step)
            s0, v0 = curve[i - 1]
            return s0 + (target - v0) / (value - v0) * (step - s0)
    return None


def savings(original: Curve, averaged: Curve, tolerances: Sequence[float], *, total_steps: int,
            gpu_hours: float, higher_is_better: bool = False, usd_per_gpu_hour: float | None = None) -> list[Saving]:
    original, averaged = sorted(original), sorted(averaged)
    if len(original) < 2 or len(averaged) < 2:
        raise SavingsError(f"need at least two evaluated steps on each curve (original: {len(original)}, "
                           f"averaged: {len(averaged)})")
    if total_steps <= 0 or gpu_hours <= 0:
        raise SavingsError("total steps and GPU hours must be positive")
    last_step, final = original[-1]
    considered = [(s, v) for s, v in averaged if s <= last_step]
    out = []
    for eps in tolerances:
        if eps < 0:
            raise SavingsError(f"tolerance must not be negative, got {eps}")
        target = final * (1 - eps / 100) if higher_is_better else final * (1 + eps / 100)
        step = first_reach(considered, target, higher_is_better)
        own = first_reach(original, target, higher_is_better)
        if step is None:
            out.append(Saving(eps, target, None, own, None, None, None, None))
            continue
        saved, ahead = last_step - step, own - step
        hours = saved / total_steps * gpu_hours
        out.append(Saving(eps, target, step, own, saved, saved / total_steps, hours,
                          None if usd_per_gpu_hour is None else hours * usd_per_gpu_hour,
                          ahead, ahead / total_steps * gpu_hours))
    return out


def match_model(name: str, stored: Sequence[str]) -> str:
    """The stored trajectory a user means: its exact name, or a Pythia size (`6.9b` means
    pythia-6.9b or pythia-6.9b-deduped, whichever the store has)."""
    if name in stored:
        return name
    found = [m for m in stored if m in (f"pythia-{name}", f"pythia-{name}-deduped")]
    if len(found) == 1:
        return found[0]
    if found:
        raise SavingsError(f"--model {name} is ambiguous here ({', '.join(found)}): give the full name")
    raise SavingsError(f"no results for model {name!r} (the store has: {', '.join(stored) or 'nothing'})")


def catalogue_gpu_hours(model: str) -> float | None:
    """Published A100 hours of a Pythia trajectory by its stored name, if any."""
    from ..trajectory.pythia import MODELS

    size = model.removeprefix("pythia-").removesuffix("-deduped")
    info = MODELS.get(size) if model.startswith("pythia-") else None
    return info.gpu_hours if info else None


@dataclass(frozen=True)
class SavingsRecord:
    """One model at one tolerance: where each curve reaches the target, and what that is worth."""

    model: str
    tag: str  # the averaged run
    task: str
    metric: str
    tolerance_pct: float
    target: float
    step_reached: float | None  # by the averaged curve (None: not by its last step)
    original_reached: float  # by the original itself
    steps_ahead: float | None  # the fair credit
    gpu_hours_ahead: float | None
    steps_saved: float | None  # the paper's figure
    pct_of_training: float | None
    gpu_hours_saved: float | None
    usd_saved: float | None = None  # with a price per GPU hour


def savings_records(rows: Sequence, models: Sequence[str], task: str, *, metric: str | None = None,
                    tag: str | None = None, tolerances: Sequence[float], total_steps: int | None = None,
                    gpu_hours: float | None = None, usd_per_gpu_hour: float | None = None,
                    where: str = "the store") -> tuple[str, list[SavingsRecord]]:
    """(metric, records) from a task's stored rows (`report.store.Row`): each model matched to a stored
    trajectory, its averaged run chosen (`tag`, or the only one), its GPU hours found (given, or Pythia's
    published figure), and refused where the two curves were scored with different settings."""
    from ..trajectory.pythia import TOTAL_STEPS
    from .store import ORIGINAL
    from .tables import primary_metric

    chosen = metric or primary_metric(r.metric for r in rows)
    rows = [r for r in rows if r.metric == chosen]
    if not rows:
        raise SavingsError(f"{where}: no {chosen!r} results for task {task!r}")
    stored = sorted({r.model for r in rows})
    table = []
    for name in models:
        m = match_model(name, stored)
        mine = [r for r in rows if r.model == m]
        tags = sorted({r.tag for r in mine if r.tag != ORIGINAL})
        run = tag or (tags[0] if len(tags) == 1 else None)
        if run is None or run not in tags:
            raise SavingsError(f"{m}: choose the averaging run with --tag ({', '.join(tags) or 'none stored'})")
        hours = gpu_hours or catalogue_gpu_hours(m)
        if hours is None:
            raise SavingsError(f"{m}: no published GPU hours; give --gpu-hours")
        used = [r for r in mine if r.tag in (ORIGINAL, run)]
        settings = sorted({r.settings for r in used})
        if len(settings) > 1:  # lm-eval's numbers move with the batch size (lm-eval #704): unlike scores
            shown = " and ".join(f"batch {b or '?'}, {d or '?'}, {v or '?'}" for b, d, v in settings)
            raise SavingsError(f"{m}: the original and {run} on {task} were scored with different settings ({shown}); "
                               f"score them again alike (`ckptavg eval --force` with one --batch-size, --dtype and "
                               f"--device) before comparing")
        better = next((r.higher_is_better for r in mine if r.higher_is_better is not None), False)
        original_curve = [(r.step, r.value) for r in mine if r.tag == ORIGINAL]
        averaged_curve = [(r.step, r.value) for r in mine if r.tag == run]
        for s in savings(original_curve, averaged_curve, tolerances, total_steps=total_steps or TOTAL_STEPS,
                         gpu_hours=hours, higher_is_better=better, usd_per_gpu_hour=usd_per_gpu_hour):
            table.append(SavingsRecord(m, run, task, chosen, s.tolerance, s.target, s.step, s.original_step,
                                       s.steps_ahead, s.gpu_hours_ahead, s.steps_saved,
                                       None if s.fraction is None else 100 * s.fraction, s.gpu_hours,
                                       s.usd if usd_per_gpu_hour else None))
    return chosen, table
