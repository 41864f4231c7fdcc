"""Pure views of result rows: the paper's Table 2 layout (rows: model and step; columns: task,
original vs averaged) and the tidy long form for scripts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from .store import ORIGINAL, Row

PRIMARY_METRICS = ("word_perplexity", "acc", "perplexity", "acc_norm", "bits_per_byte", "exact_match")


def primary_metric(metrics: Iterable[str]) -> str:
    """The metric a task is shown by when the user names none: perplexities before accuracies."""
    metrics = sorted(set(metrics))
    return next((m for m in PRIMARY_METRICS if m in metrics), metrics[0])


@dataclass(frozen=True)
class Column:
    task: str
    metric: str
    tag: str
    higher_is_better: bool | None


@dataclass(frozen=True)
class WideTable:
    columns: tuple[Column, ...]
    rows: tuple[tuple[str, int, tuple[float | None, ...]], ...]  # (model, step, one value per column)

    def beats_original(self, values: tuple[float | None, ...], i: int) -> bool:
        """Whether column i's value is better than the original's on the same task (and row)."""
        c, v = self.columns[i], values[i]
        if c.tag == ORIGINAL or v is None or c.higher_is_better is None:
            return False
        original = next((values[j] for j, o in enumerate(self.columns) if o.task == c.task and o.tag == ORIGINAL), None)
        return original is not None and v != original and (v > original) == c.higher_is_better


def wide_table(rows: Sequence[Row], metric: str | None = None) -> WideTable:
    tasks = sorted({r.task for r in rows})
    columns = []
    for task in tasks:
        mine = [r for r in rows if r.task == task]
        m = metric if metric in {r.metric for r in mine} else primary_metric(r.metric for r in mine)
        tags = sorted({r.tag for r in mine if r.metric == m}, key=lambda t: (t != ORIGINAL, t))
        better = next((r.higher_is_better for r in mine if r.metric == m), None)
        columns += [Column(task, m, tag, better) for tag in tags]
    values = {(r.model, r.step, r.task, r.metric, r.tag): r.value for r in rows}
    keys = sorted({(r.model, r.step) for r in rows})
    return WideTable(tuple(columns), tuple(
        (model, step, tuple(values.get((model, step, c.task, c.metric, c.tag)) for c in columns))
        for model, step in keys))


def shared_affixes(names: Sequence[str]) -> tuple[str, str]:
    """(prefix, suffix) that every name shares, cut at a `-`, leaving each name something of its own: what a
    table's title can say once instead of every row or header (`tiny-pythia-` of two runs, `-k5-nu50` of
    five methods). Nothing for fewer than two names."""
    names = list(dict.fromkeys(names))
    if len(names) < 2:
        return "", ""
    parts = [n.split("-") for n in names]
    shortest = min(len(p) for p in parts) - 1  # each keeps a part of its own
    lead = 0
    while lead < shortest and len({p[lead] for p in parts}) == 1:
        lead += 1
    tail = 0
    while tail < shortest - lead and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    prefix = "-".join(parts[0][:lead]) + ("-" if lead else "")
    suffix = ("-" if tail else "") + "-".join(parts[0][len(parts[0]) - tail:])
    return prefix, suffix


def shortened(name: str, prefix: str, suffix: str) -> str:
    return name[len(prefix):len(name) - len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else name


TIDY_FIELDS = ("model", "tag", "method", "k", "nu", "step", "task", "metric", "value", "stderr", "limit",
               "lm_eval_version", "batch_size", "dtype", "device")


def tidy(rows: Sequence[Row]) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k in TIDY_FIELDS} for r in rows]


def mixed_settings(rows: Sequence[Row]) -> list[str]:
    """Curves (model, run, task, metric) whose points were scored with different settings (batch size, dtype,
    device): lm-eval's numbers move with them, so such a curve compares unlike things. One line each."""
    seen: dict[tuple, set] = {}
    for r in rows:
        if r.status == "ok":
            seen.setdefault((r.model, r.tag, r.task, r.metric), set()).add(r.settings)
    return [f"{model} {tag} {task} {metric}: scored with " + " and ".join(
                sorted(f"batch {b or '?'}, {d or '?'}, {v or '?'}" for b, d, v in settings))
            for (model, tag, task, metric), settings in sorted(seen.items()) if len(settings) > 1]
