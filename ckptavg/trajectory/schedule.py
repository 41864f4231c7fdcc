"""Pure planning of a trajectory run: which outputs, which weights, which downloads when.

No I/O and no torch: every function here maps steps and sizes to a plan, so the whole run
(and its disk peak) is known, printed and checked before the first byte is fetched.

Semantics (exact):
- LAWA at step t with k, nu: members {t - j*nu : j = 0..k-1}, each weighted 1/k. Outputs at
  start, start+interval, ..., <= end.
- EMA over the checkpoint sequence c_0, c_1, ...: e_0 = c_0, e_i = (1-a) e_{i-1} + a c_i, i.e.
  weight (1-a)^i on c_0 and a(1-a)^(i-j) on c_j.
- SWA from step s: the uniform mean of every sequence checkpoint from s to t.
The sequence for EMA and SWA is every step any LAWA window of the same run would use, so the
three methods see the same checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import MissingStepsError, ScheduleError

EMA_TAIL = 1e-6  # EMA terms older than this much total weight are dropped (recorded in the manifest)


@dataclass(frozen=True)
class Window:
    """One output: the weighted sum of the checkpoints at `members` (oldest first)."""

    step: int
    members: tuple[int, ...]
    weights: tuple[float, ...]
    dropped_weight: float = 0.0  # EMA tail mass left out


def check_spacing(k: int, nu: int, interval: int) -> None:
    if k < 1:
        raise ScheduleError(f"--k must be at least 1, got {k}")
    if nu <= 0:
        raise ScheduleError(f"--nu must be positive, got {nu}")
    if interval <= 0:
        raise ScheduleError(f"--interval must be positive, got {interval}")


def validate(k: int, nu: int, interval: int, start: int, end: int) -> None:
    check_spacing(k, nu, interval)
    if start > end:
        raise ScheduleError(f"--start ({start}) is after --end ({end})")
    if start - (k - 1) * nu < 0:
        raise ScheduleError(f"the first window reaches back to step {start - (k - 1) * nu}: "
                            f"raise --start to at least {(k - 1) * nu}")


def output_steps(start: int, end: int, interval: int) -> list[int]:
    return list(range(start, end + 1, interval))


def lawa_members(step: int, k: int, nu: int) -> tuple[int, ...]:
    return tuple(step - j * nu for j in range(k - 1, -1, -1))


def _check_available(windows: list[Window], available: Iterable[int] | None, skip_incomplete: bool
                     ) -> list[Window]:
    if available is None:
        return windows
    have = set(available)
    kept = []
    for w in windows:
        missing = [s for s in w.members if s not in have]
        if not missing:
            kept.append(w)
        elif not skip_incomplete:
            raise MissingStepsError(f"window at step {w.step} needs step(s) {', '.join(map(str, missing))}, "
                                f"which the trajectory does not have (pass --skip-incomplete to skip it)")
    return kept


def sequence(k: int, nu: int, interval: int, start: int, end: int) -> list[int]:
    """The checkpoint steps the LAWA windows of this run use, in order."""
    return sorted({s for t in output_steps(start, end, interval) for s in lawa_members(t, k, nu)})


def lawa_windows(k: int, nu: int, interval: int, start: int, end: int,
                 available: Iterable[int] | None = None, skip_incomplete: bool = False,
                 weights: Sequence[float] | None = None) -> list[Window]:
    """LAWA's windows; with `weights` (one per member, oldest first) the same windows weighted otherwise."""
    validate(k, nu, interval, start, end)
    w = tuple(weights) if weights is not None else tuple([1.0 / k] * k)
    windows = [Window(t, lawa_members(t, k, nu), w) for t in output_steps(start, end, interval)]
    return _check_available(windows, available, skip_incomplete)


def wma_weights(k: int) -> list[float]:
    """PMA's weighted moving average: member i (1 = oldest) gets i / (k(k+1)/2)."""
    total = k * (k + 1) // 2
    return [i / total for i in range(1, k + 1)]


DECAY_SHAPES = {  # f on [0, 1], f(0) = 1, f(1) = 0
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: (1.0 + math.cos(math.pi * x)) / 2.0,
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}


def decay_weights(k: int, shape: str) -> list[float]:
    """WSM's decay-shaped merge: member i (1 = oldest) gets f((i-1)/k) - f(i/k). Merging with these equals
    training with a learning-rate multiplier f(j/k) on the updates between members j and j+1 (the tail
    sums). Linear is exactly LAWA's uniform 1/k, returned as such so that its average is LAWA's, bit for bit."""
    if shape not in DECAY_SHAPES:
        raise ScheduleError(f"unknown decay shape {shape!r} (choose from {', '.join(DECAY_SHAPES)})")
    if shape == "linear":
        return [1.0 / k] * k
    f = DECAY_SHAPES[shape]
    return [f((i - 1) / k) - f(i / k) for i in range(1, k + 1)]


def ema_window_weights(k: int, alpha: float) -> list[float]:
    """PMA's EMA inside one window: w_1 = (1-a)^(k-1), w_i = a (1-a)^(k-i) for i >= 2 (1 = oldest)."""
    return ema_weights(k, alpha)


def ema_weights(n: int, alpha: float) -> list[float]:
    """Closed-form weights of e_{n-1} over c_0..c_{n-1}."""
    if not 0.0 < alpha <= 1.0:
        raise ScheduleError(f"--ema-alpha must be in (0, 1], got {alpha}")
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - 1 - j) for j in range(1, n)]


def ema_windows(k: int, nu: int, interval: int, start: int, end: int, alpha: float,
                available: Iterable[int] | None = None, skip_incomplete: bool = False,
                tail: float = EMA_TAIL) -> list[Window]:
    validate(k, nu, interval, start, end)
    seq = sequence(k, nu, interval, start, end)
    windows = []
    for t in output_steps(start, end, interval):
        members = [s for s in seq if s <= t]
        weights = ema_weights(len(members), alpha)
        # drop the oldest terms while their combined weight stays under `tail`
        cut, dropped = 0, 0.0
        while cut < len(weights) - 1 and dropped + weights[cut] < tail:
            dropped += weights[cut]
            cut += 1
        windows.append(Window(t, tuple(members[cut:]), tuple(weights[cut:]), dropped))
    return _check_available(windows, available, skip_incomplete)


def swa_windows(k: int, nu: int, interval: int, start: int, end: int, swa_start: int | None = None,
                available: Iterable[int] | None = None, skip_incomplete: bool = False) -> list[Window]:
    validate(k, nu, interval, start, end)
    seq = sequence(k, nu, interval, start, end)
    first = seq[0] if swa_start is None else swa_start
    windows = []
    for t in output_steps(start, end, interval):
        members = [s for s in seq if first <= s <= t]
        if not members:
            raise ScheduleError(f"--swa-start {first} is after the output step {t}")
        windows.append(Window(t, tuple(members), tuple([1.0 / len(members)] * len(members))))
    return _check_available(windows, available, skip_incomplete)


@dataclass(frozen=True)
class Action:
    kind: str  # "fetch" | "average" | "evict"
    step: int  # the revision's step, or the window's output step
    disk_after: int  # bytes of downloads resident (plus the output being written, for "average")
    window: int = -1  # for "average": the window's index in the list that was planned


@dataclass(frozen=True)
class FetchPlan:
    actions: tuple[Action, ...]
    download_bytes: int
    peak_disk: int

    @property
    def fetches(self) -> list[int]:
        return [a.step for a in self.actions if a.kind == "fetch"]


def plan_fetches(windows: Sequence[Window], sizes: Mapping[int, int], output_bytes: int = 0,
                 keep_downloads: bool = False, disk_budget: int | None = None) -> FetchPlan:
    """Fetch each revision just before its first window, evict it after its last.

    Every revision is fetched exactly once across the run. `sizes` maps step -> bytes on disk;
    `output_bytes` is the size of one output, which is on disk while its window is averaged.
    Raises if `disk_budget` is smaller than the plan's peak.
    """
    last_use: dict[int, int] = {}
    for i, w in enumerate(windows):
        for s in w.members:
            last_use[s] = i
    resident: set[int] = set()
    disk, peak, total = 0, 0, 0
    actions: list[Action] = []
    for i, w in enumerate(windows):
        for s in w.members:
            if s not in resident:
                resident.add(s)
                disk += sizes[s]
                total += sizes[s]
                actions.append(Action("fetch", s, disk))
        peak = max(peak, disk + output_bytes)
        actions.append(Action("average", w.step, disk + output_bytes, i))
        if not keep_downloads:
            for s in w.members:
                if last_use[s] == i and s in resident:
                    resident.discard(s)
                    disk -= sizes[s]
                    actions.append(Action("evict", s, disk))
    if disk_budget is not None and peak > disk_budget:
        biggest = max((sum(sizes[s] for s in w.members) + output_bytes for w in windows), default=0)
        if biggest > disk_budget:
            raise ScheduleError(f"--disk-budget {disk_budget / 1e9:.1f} GB cannot hold one window: "
                                f"{biggest / 1e9:.1f} GB needed (its checkpoints plus one output)")
        raise ScheduleError(f"this run peaks at {peak / 1e9:.1f} GB of disk, over --disk-budget "
                            f"{disk_budget / 1e9:.1f} GB" + ("" if not keep_downloads else
                                                             " (without --keep-downloads it would need less)"))
    return FetchPlan(tuple(actions), total, peak)


def steps_of(windows: Sequence[Window]) -> list[int]:
    return sorted({s for w in windows for s in w.members})


def weight_sum_ok(window: Window) -> bool:
    return math.isclose(math.fsum(window.weights) + window.dropped_weight, 1.0, abs_tol=1e-9)


def steps_for_tokens(tokens: int, tokens_per_step: int, option: str) -> int:
    """A spacing given in tokens, in training steps; it must be a whole number of them."""
    steps, rest = divmod(tokens, tokens_per_step)
    if rest:
        below, above = steps * tokens_per_step, (steps + 1) * tokens_per_step
        nearest = ([f"{below:,} ({steps} steps)"] if steps else []) + [f"{above:,} ({steps + 1} steps)"]
        raise ScheduleError(f"{option} {tokens:,} tokens is not a whole number of {tokens_per_step:,}-token steps: "
                            f"the nearest are {' and '.join(nearest)}")
    return steps
