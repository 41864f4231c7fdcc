"""Every averaging method in one place: its name, the parameters it reads, its run tag, its windows (members
and weights) and what its manifest records. The planner (`RunSpec`), the CLI's help and checks, and the
study file all read this table: adding a method is adding one entry.

Each method is a weighted sum of the checkpoints of a window (members oldest first, i = 1..k):

    lawa        LAWA (Kaddour 2022; Sanyal et al. 2023): uniform, w_i = 1/k
    wma         weighted moving average (PMA, arXiv 2505.12082): w_i = i / (k(k+1)/2)
    decay       decay-shaped merge (WSM, arXiv 2507.17634): w_i = f((i-1)/k) - f(i/k) for a decay shape f,
                f(0) = 1, f(1) = 0: linear f = 1 - x (exactly LAWA), cosine f = (1 + cos(pi x)) / 2,
                1-sqrt f = 1 - sqrt(x). The tail sums are f(j/k): merging equals a learning-rate decay of
                that shape over the window. The oldest member gets 1 - f(1/k), the newest f((k-1)/k): the
                convention of Megatron-LM's weighted_merge.py too (which sets the oldest to 1 minus the
                others, has no cosine shape, and computes linear by the formula, not as 1/k).
    ema-window  EMA inside the window (PMA): w_1 = (1-a)^(k-1), w_i = a (1-a)^(k-i) for i >= 2
    ema         EMA over the whole checkpoint sequence so far: e_0 = c_0, e_i = (1-a) e_(i-1) + a c_i
    swa         SWA: the uniform mean of every checkpoint from the start step on
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ScheduleError
from .schedule import (
    DECAY_SHAPES,
    Window,
    check_spacing,
    decay_weights,
    ema_window_weights,
    ema_windows,
    lawa_windows,
    swa_windows,
    wma_weights,
)

if TYPE_CHECKING:
    from .run import RunSpec

DEFAULT_EMA_ALPHA = 0.9  # ema and ema-window: the newest checkpoint's weight
DEFAULT_DECAY_SHAPE = "1-sqrt"  # decay: WSM's best shape


@dataclass(frozen=True)
class MethodDef:
    name: str
    summary: str  # one line, for --help
    params: tuple[str, ...]  # the RunSpec fields it reads besides k and nu
    tag: Callable[[RunSpec], str]
    windows: Callable[[RunSpec, Iterable[int] | None], list[Window]]
    record: Callable[[RunSpec, Window], dict]  # method-specific manifest fields


def _common(s: RunSpec, available) -> dict:
    return dict(k=s.k, nu=s.nu, interval=s.interval, start=s.start, end=s.end, available=available,
                skip_incomplete=s.skip_incomplete)


def _base(s: RunSpec) -> str:
    return f"k{s.k}-nu{s.nu}"


METHODS: dict[str, MethodDef] = {m.name: m for m in (
    MethodDef("lawa", "uniform over the latest k checkpoints, nu steps apart", (),
              lambda s: f"lawa-{_base(s)}", lambda s, a: lawa_windows(**_common(s, a)), lambda s, w: {}),
    MethodDef("wma", "weights growing linearly with recency, i / (k(k+1)/2)", (),
              lambda s: f"wma-{_base(s)}", lambda s, a: lawa_windows(**_common(s, a), weights=wma_weights(s.k)),
              lambda s, w: {}),
    MethodDef("decay", "decay-shaped weights f((i-1)/k) - f(i/k), shape from --decay-shape", ("decay_shape",),
              lambda s: f"decay-{s.decay_shape.replace('-', '')}-{_base(s)}",
              lambda s, a: lawa_windows(**_common(s, a), weights=decay_weights(s.k, s.decay_shape)),
              lambda s, w: {"decay_shape": s.decay_shape}),
    MethodDef("ema-window", "EMA inside each window of k checkpoints", ("ema_alpha",),
              lambda s: f"ema-window-alpha{s.ema_alpha:g}-{_base(s)}",
              lambda s, a: lawa_windows(**_common(s, a), weights=ema_window_weights(s.k, s.ema_alpha)),
              lambda s, w: {"alpha": s.ema_alpha}),
    MethodDef("ema", "EMA over the whole checkpoint sequence", ("ema_alpha",),
              lambda s: f"ema-alpha{s.ema_alpha:g}-{_base(s)}", lambda s, a: ema_windows(alpha=s.ema_alpha,
                                                                                       **_common(s, a)),
              lambda s, w: {"alpha": s.ema_alpha, "dropped_tail_weight": w.dropped_weight}),
    MethodDef("swa", "uniform mean of every checkpoint since --swa-start", ("swa_start",),
              lambda s: f"swa-from{s.swa_start if s.swa_start is not None else 'first'}-{_base(s)}",
              lambda s, a: swa_windows(swa_start=s.swa_start, **_common(s, a)),
              lambda s, w: {"swa_start": w.members[0]}),
)}


def method(name: str) -> MethodDef:
    if name not in METHODS:
        raise ScheduleError(f"unknown --method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]


def check_parameters(method_name: str, k: int, nu: int, interval: int, ema_alpha: float = DEFAULT_EMA_ALPHA,
                     decay_shape: str = DEFAULT_DECAY_SHAPE) -> None:
    """What can be checked before the trajectory's steps are known (so before any listing)."""
    uses = method(method_name).params
    check_spacing(k, nu, interval)
    if "ema_alpha" in uses and not 0.0 < ema_alpha <= 1.0:
        raise ScheduleError(f"--ema-alpha must be in (0, 1], got {ema_alpha}")
    if "decay_shape" in uses and decay_shape not in DECAY_SHAPES:
        raise ScheduleError(f"unknown --decay-shape {decay_shape!r} (choose from {', '.join(DECAY_SHAPES)})")


def help_text() -> str:
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
