"""Figures from result rows: a metric against training step, one line per trajectory (the original,
and each averaging run), as in the paper's Figures 4 to 7."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..atomic import replacing
from ..errors import InputError
from .savings import SavingsRecord
from .store import ORIGINAL, Row


def series(rows: Sequence[Row], task: str, metric: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(model, tag) -> [(step, value)], sorted by step."""
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r.task == task and r.metric == metric and r.value is not None:
            lines.setdefault((r.model, r.tag), []).append((r.step, r.value))
    return {k: sorted(v) for k, v in sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1] != ORIGINAL, kv[0][1]))}


def _axes():
    """A figure drawn off-screen (no display is needed), the same size for every plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0), dpi=120)


def plot_trajectories(rows: Sequence[Row], task: str, metric: str, out: Path, title: str | None = None) -> Path:
    lines = series(rows, task, metric)
    if not lines:
        raise InputError(f"no results for task {task!r}, metric {metric!r}")
    models = {m for m, _ in lines}
    fig, ax = _axes()
    for (model, tag), points in lines.items():
        label = tag if len(models) == 1 else f"{model} {tag}"
        style = dict(color="black", linestyle="--") if tag == ORIGINAL else {}
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=label, **style)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    if "perplexity" in metric:
        ax.set_yscale("log")
    ax.set_title(title or (f"{next(iter(models))}: {task}" if len(models) == 1 else task))
    return _save(fig, ax, out)


def _save(fig, ax, out: Path) -> Path:
    """Atomically, like every other output: a reader never sees half an image."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing(out) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return out


def plot_savings(records: Sequence[SavingsRecord], out: Path) -> Path:
    """GPU hours against tolerance, one colour per model: solid, the fair credit (how much earlier than
    the original the averaged curve reaches the target); dashed and faint, the paper's Figure 13 figure
    (measured from the original's last step, which above 0% mostly measures the curve's shape)."""
    import matplotlib.pyplot as plt

    fig, ax = _axes()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(dict.fromkeys(r.model for r in records)):
        mine = [r for r in records if r.model == model]
        for key, label, style in (("gpu_hours_ahead", "ahead of the original", dict(marker="o")),
                                  ("gpu_hours_saved", "paper's 'saved'", dict(linestyle="--", alpha=0.45))):
            points = [(r.tolerance_pct, getattr(r, key)) for r in mine if getattr(r, key) is not None]
            if points:
                ax.plot([p for p, _ in points], [h for _, h in points], color=colours[i % len(colours)],
                        label=f"{model}: {label}", **style)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("tolerance (% of the original's final value)")
    ax.set_ylabel("GPU hours")
    ax.set_title(f"{records[0].task} {records[0].metric}: GPU hours ahead of the original")
    return _save(fig, ax, out)
