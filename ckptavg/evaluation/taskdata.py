"""Where each lm-eval task's data comes from, whether it is in the cache, and fetching it: so that a study
scores on nodes without a network, and a task that cannot load fails before anything is scored.

lm-eval reads a task's data with `datasets.load_dataset(dataset_path, dataset_name, **dataset_kwargs)`,
from the Hub unless the path is one of `datasets`' own builders (json, csv, parquet, ...) over local
files (ckptavg's perplexity tasks are those). For a Hub dataset, `load_dataset_builder` finds out without
downloading the data whether it can load at all (datasets 4+ refuses a repo that ships a loading script:
lm-eval #3171), and which prepared copy in the datasets cache it would read; fetching is `load_dataset`
itself, on a machine with a network, into the caches every later run reads (`HF_HOME`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OptionError

# what a Pythia-era paper meant by a task name, where lm-eval 0.4 means something else by it
NOTES = {
    "wsc": "SuperGLUE's WSC (lm-eval 0.4); Pythia-era papers meant the Winograd schema challenge: wsc273",
    "wsc273": "the Winograd schema challenge (273 problems), as Pythia-era papers report WSC",
}


@dataclass(frozen=True)
class TaskData:
    task: str
    path: str  # dataset_path: a Hub dataset repo, or one of `datasets`' builders reading local files
    name: str | None = None  # dataset_name: the repo's config
    splits: tuple[str, ...] = ()  # the splits the task's config names
    kwargs: dict = field(default_factory=dict, compare=False)  # dataset_kwargs (data_files, revision...)

    @property
    def on_hub(self) -> bool:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        return self.path not in _PACKAGED_DATASETS_MODULES and not Path(self.path).exists()

    @property
    def where(self) -> str:
        return self.path + (f" ({self.name})" if self.name else "")

    @property
    def note(self) -> str:
        return NOTES.get(self.task, "")


def task_data(manager, tasks: Sequence[str]) -> list[TaskData]:
    """Each task's data as its lm-eval config names it; a group stands for its tasks."""
    found: list[TaskData] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        entry = manager.task_index.get(name)
        cfg = dict(getattr(entry, "cfg", None) or {})
        if cfg.get("dataset_path"):
            splits = tuple(dict.fromkeys(s for s in (cfg.get("test_split"), cfg.get("validation_split"),
                                                     cfg.get("fewshot_split"), cfg.get("training_split")) if s))
            found.append(TaskData(name, str(cfg["dataset_path"]), cfg.get("dataset_name"), splits,
                                  dict(cfg.get("dataset_kwargs") or {})))
            return
        members = cfg.get("task") or []
        for member in members if isinstance(members, list) else [members]:
            add(member if isinstance(member, str) else str(member.get("task", "")))

    for t in tasks:
        add(t)
    return found


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"


def _builder(d: TaskData):
    import datasets

    kwargs = {k: v for k, v in d.kwargs.items() if k in ("data_files", "data_dir", "revision", "token")}
    with _quiet():
        return datasets.load_dataset_builder(d.path, d.name, **kwargs)


def problem(d: TaskData) -> str | None:
    """Why the task's data cannot load here and now (None: it can): a loading script datasets refuses, a
    repo or config the Hub does not have, or, offline, a dataset not in the cache."""
    if not d.on_hub:
        return None
    try:
        builder = _builder(d)
    except Exception as e:  # noqa: BLE001  (datasets raises many kinds; each is the reason to say)
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "scripts are no longer supported" in text:
            from importlib.metadata import version

            return (f"{d.where} ships a loading script, which datasets {version('datasets')} refuses to run "
                    f"({text})")
        if offline():
            return f"{d.where} is not in the cache and the Hub is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
        return f"{d.where} cannot load: {type(e).__name__}: {text}"
    if offline() and not _prepared(builder):
        return f"{d.where} is not in the cache and the Hub is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
    return None


def cached(d: TaskData) -> bool | None:
    """Whether the task's data is prepared in the datasets cache (None: local files, nothing to cache).
    Asked of the cache's folders, as `datasets` lays them out (`NAMESPACE___NAME/CONFIG/VERSION/HASH/`),
    without the Hub: a listing of many tasks must not wait on the network. (Whether the cached copy is the
    Hub's newest is the builder's question, which `problem` asks before scoring.)"""
    if not d.on_hub:
        return None
    import datasets

    folder = Path(datasets.config.HF_DATASETS_CACHE) / d.path.replace("/", "___") / (d.name or "default")
    return any(folder.glob("*/*/dataset_info.json"))


def _prepared(builder) -> bool:
    return Path(builder.cache_dir, "dataset_info.json").is_file()


def fetch(d: TaskData) -> None:
    """Download and prepare the task's data into the caches, as lm-eval will read it."""
    import datasets

    with _quiet():
        datasets.load_dataset(d.path, d.name, **d.kwargs)


def check(manager, tasks: Sequence[str]) -> None:
    """Every task's data can load: the first that cannot is a one-line error, before anything is scored."""
    for d in task_data(manager, tasks):
        why = problem(d)
        if why:
            hint = (f"; `ckptavg tasks fetch {d.task}` on a machine with a network puts it in the cache"
                    if "not in the cache" in why else "")
            raise OptionError(f"task {d.task}: its dataset {why}{hint}")


class _quiet:
    """datasets' progress bars and logging, off while ckptavg asks it things (it draws its own)."""

    def __enter__(self):
        import datasets

        self.bars = datasets.utils.are_progress_bars_disabled()
        self.level = datasets.logging.get_verbosity()
        datasets.utils.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        import datasets

        if not self.bars:
            datasets.utils.enable_progress_bars()
        datasets.logging.set_verbosity(self.level)
