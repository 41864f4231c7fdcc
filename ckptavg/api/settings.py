"""The settings a run is made with, checked when they are made: how to average (`Averaging`) and how to
score (`Scoring`, `scoring`), so that a bad value fails before anything is listed, fetched or written."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import options as opt
from ..engine.ranks import TIMEOUT_S, Ranks
from ..errors import OptionError
from ..report.tracking import Tracking

ByteBar = Callable[[str, int], Callable[[int], None]]  # (description, total bytes) -> advance(n)


def torch_dtype(name: str):
    """A dtype name checked by `options.choice`, as torch's (None for auto)."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def resolve_device(name: str) -> str:
    """The syntax, and whether a CUDA device asked for is really there (this imports torch)."""
    from ..engine.pipeline import resolve_device as resolve

    return str(resolve(opt.device(name)))


# -- scoring settings -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scoring:
    """What to score with and how; made by `scoring()`, which checks every value first."""

    tasks: tuple[str, ...]
    results: Path
    pile: Path | None = None
    ppl_files: dict[str, Path] = field(default_factory=dict)
    include_path: tuple[Path, ...] = ()
    limit: int | None = None
    batch_size: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    originals: bool = True
    in_memory: bool = False
    fresh_model: bool = False  # build a model per checkpoint instead of swapping weights into one (same scores)
    diversity: Path | None = None  # a text: also measure how consecutive window members disagree on it
    tracking: Tracking | None = None  # trackers each score is logged to as it is stored (`report/tracking.py`)
    manager: object = None  # lm-eval's TaskManager, every task registered; None until `registered()`

    def registered(self) -> Scoring:
        return self if self.manager is not None else replace(self, manager=_register_tasks(self))


def scoring(tasks: str | Iterable[str], results: str | Path = "results.sqlite", *, pile: Path | None = None,
            ppl_task: Sequence[str] = (), include_path: Sequence[Path] = (), limit: int | None = None,
            batch_size: str = "auto", device: str = "auto", dtype: str = "auto", originals: bool = True,
            in_memory: bool = False, fresh_model: bool = False, diversity: Path | None = None,
            tracking: Tracking | None = None, register: bool = True) -> Scoring:
    """Checked scoring settings. `register` also registers the tasks with lm-eval, which is what finds an
    unknown task name (a dry run can skip it: importing lm-eval and indexing its tasks takes seconds)."""
    from ..evaluation.tasks import PILE_SUBSETS

    task_list = opt.tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    pile_wanted = [t for t in task_list if t in PILE_SUBSETS]
    if pile_wanted and pile is None:
        raise OptionError(f"{', '.join(pile_wanted)} need --pile FILE (a local Pile-format file; the Pile itself "
                          f"can no longer be downloaded), or leave them out of the tasks")
    checked = Scoring(tuple(task_list), Path(results), opt.existing_file(pile, "--pile"),
                      opt.named_files(ppl_task, "--ppl-task"), tuple(opt.existing_dirs(include_path, "--include-path")),
                      opt.limit(limit), opt.batch_size(batch_size), opt.device(device),
                      opt.choice(dtype, opt.EVAL_DTYPES, "--dtype"), originals, in_memory, fresh_model,
                      opt.existing_file(diversity, "--diversity"), tracking.checked() if tracking else None)
    return checked.registered() if register else checked


def task_index(s: Scoring):
    """lm-eval's task index with our perplexity tasks in it (PILE subsets cut from the Pile file, --ppl-task
    files), every task of `s` known to it; nothing asked about their data."""
    from ..evaluation.harness import check_tasks, quiet_lm_eval, task_manager
    from ..evaluation.tasks import PILE_SUBSETS, perplexity_tasks, pile_tasks

    quiet_lm_eval()
    paths = list(s.include_path)
    pile_wanted = [t for t in s.tasks if t in PILE_SUBSETS]
    if pile_wanted:
        paths.append(pile_tasks(s.pile, pile_wanted))
    if s.ppl_files:
        paths.append(perplexity_tasks(s.ppl_files))
    manager = task_manager(paths, s.tasks)
    check_tasks(manager, s.tasks)
    return manager


def _register_tasks(s: Scoring):
    """The task index, and every task's data able to load here: one that cannot fails now, not once per
    checkpoint."""
    from ..evaluation.taskdata import check

    manager = task_index(s)
    check(manager, s.tasks)
    return manager


@dataclass(frozen=True)
class Averaging:
    """How a trajectory run averages and fetches. `checked()` validates every value (and, for a real run,
    finds out whether the device is there) before any listing or download."""

    device: str = "auto"
    dtype: str = "auto"  # auto (as stored), float16, bfloat16, float32, float64
    disk_budget: int | str | None = None  # bytes, or a size such as "200GB"
    copy: tuple[str, ...] = ()  # fnmatch patterns of tensors to copy from the newest input, never average
    keep_downloads: bool = False
    force: bool = False  # redo finished outputs
    output_format: str = "auto"  # auto (the inputs' own: DCP, a trainer's file; else safetensors), or one
    ranks: Ranks | None = None  # launched by torchrun or srun (`engine.ranks.from_environment()`): each window shared
    timeout: float = TIMEOUT_S  # seconds a rank may be silent before the others stop

    def checked(self, dry_run: bool = False) -> Averaging:
        budget = opt.size(self.disk_budget, "--disk-budget") if isinstance(self.disk_budget, str) else self.disk_budget
        return replace(self, device=opt.device(self.device) if dry_run else resolve_device(self.device),
                       dtype=opt.choice(self.dtype, opt.AVERAGE_DTYPES, "--dtype"), disk_budget=budget,
                       copy=opt.copy_patterns(self.copy),
                       output_format=opt.choice(self.output_format, opt.OUTPUT_FORMATS, "--output-format"))
