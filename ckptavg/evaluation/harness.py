"""Scoring one checkpoint with lm-evaluation-harness, task by task.

Each checkpoint gets its own `HFLM` instance and lm-eval's response cache is never used: that
cache does not key on the weights, so a second checkpoint could silently get the first one's
scores (lm-eval issues #2715, #4063). Tasks run one `simple_evaluate` call each, so a task that
fails (a dataset missing offline, say) is reported and the others still run.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

BOOTSTRAP_ITERS = 1000  # for the stderr of metrics that have no closed form (perplexities)
DEFAULT_TASKS = ("pile-philpapers", "pile-bookcorpus2", "pile-youtubesubtitles", "pile-enron",
                 "lambada_openai", "sciq", "arc_easy", "wikitext", "boolq")


@dataclass(frozen=True)
class Score:
    metric: str
    value: float
    stderr: float | None
    higher_is_better: bool | None


@dataclass(frozen=True)
class TaskOutcome:
    task: str
    scores: tuple[Score, ...]
    error: str = ""


def quiet_lm_eval() -> None:
    """lm-eval and datasets log every step and draw tqdm bars; ckptavg draws its own progress."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def task_manager(include_paths: Sequence[Path], tasks: Sequence[str] = ()):
    """lm-eval's task index. Indexing lm-eval's own thousands of tasks takes seconds, so when every
    wanted task is one of ours (in `include_paths`) the index holds only those."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths] or None
    if paths and tasks:
        ours = TaskManager(include_path=paths, include_defaults=False)
        if set(tasks) <= set(ours.all_tasks):
            return ours
    return TaskManager(include_path=paths)


def check_tasks(manager, tasks: Sequence[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        pile = [t for t in unknown if t.startswith("pile-")]
        hint = " (PILE subsets need --pile FILE)" if pile else ""
        raise InputError(f"unknown lm-eval task(s): {', '.join(unknown)}{hint}")


def effective_settings(device: str, dtype: str, batch_size: str) -> tuple[str, str]:
    """(batch size, dtype) as a checkpoint is scored with them: auto is float32 and batches of 8 on a CPU
    (lm-eval's batch-size search is meant for GPUs); on a GPU, auto stays auto (as stored, searched)."""
    if dtype == "auto" and device == "cpu":
        dtype = "float32"
    if batch_size == "auto" and device == "cpu":
        batch_size = "8"
    return batch_size, dtype


def load_model(folder: Path, device: str, dtype: str, batch_size: str, *, state_dict: dict | None = None,
               trust_remote_code: bool = False):
    """An lm-eval model for one checkpoint folder, or for `state_dict` (weights as stored, e.g. an
    average made in memory) with the folder's config and tokenizer."""
    from lm_eval.models.huggingface import HFLM

    batch_size, dtype = effective_settings(device, dtype, batch_size)
    if state_dict is None:
        return HFLM(pretrained=str(folder), device=device, dtype=dtype, batch_size=batch_size,
                    trust_remote_code=trust_remote_code)
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)  # "auto" only reaches here on a GPU
    # transformers' own loading, so that its renames of stored names (embed_out -> lm_head) apply;
    # the Auto class wants a path, the architecture's own class takes the weights alone
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        raise InputError(f"{folder}/config.json names no architecture transformers knows ({architecture})")
    model, info = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch_dtype,
                                              output_loading_info=True)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise InputError(f"the averaged weights lack {len(missing)} tensor(s) the model needs, e.g. {missing[0]}")
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)


def _number(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _hint(task: str, manager, error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        try:
            cfg = manager.task_index[task].cfg or {}
        except (AttributeError, KeyError, TypeError):  # the hint is a courtesy; the error is what matters
            cfg = {}
        path, name = cfg.get("dataset_path"), cfg.get("dataset_name")
        if path:
            args = repr(path) + (f", {name!r}" if name else "")
            text += (f" (offline: pre-download the dataset {path}{'/' + name if name else ''} into the datasets "
                     f"cache where there is network: `python -c \"import datasets; datasets.load_dataset({args})\"`)")
    return f"{type(error).__name__}: {text}"


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """lm-eval draws tqdm bars it will not let us disable and runs `git` (which complains outside a
    repository) on every call: both go to file descriptor 2, which is pointed at /dev/null meanwhile."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _evaluate(lm, task: str, manager, limit: int | None) -> dict:
    """What `lm_eval.simple_evaluate(model=lm, tasks=[task], ...)` computes: the same seeds, task loading
    and few-shot defaults, then lm-eval's own `evaluate`. Not `simple_evaluate` itself, because after
    scoring it surveys the environment (torch's `collect_env`, which runs `pip list` in subprocesses):
    most of the time a small model's checkpoint takes. That the results are equal is tested."""
    import random

    import numpy as np
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate
    from lm_eval.utils import set_torch_seed

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    set_torch_seed(DEFAULT_OTHER_SEED)
    loaded = manager.load([task])
    for task_obj in loaded["tasks"].values():
        if task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    return evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
                    verbosity="ERROR")


def score(lm, tasks: Sequence[str], manager, limit: int | None = None) -> Iterator[TaskOutcome]:
    """Run each task on `lm`; yields one outcome per task, failed ones with their error."""
    for task in tasks:
        try:
            with _stderr_silenced():
                out = _evaluate(lm, task, manager, limit)
            results = out["results"][task]
            better = out.get("higher_is_better", {}).get(task, {})
        except Exception as e:  # one bad task must not end a long study
            yield TaskOutcome(task, (), _hint(task, manager, e))
            continue
        scores = []
        for key, value in results.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or _number(value) is None:
                continue
            stderr = _number(results.get(f"{metric}_stderr,{filt}"))
            name = metric if filt == "none" else f"{metric},{filt}"
            scores.append(Score(name, float(value), stderr, better.get(metric)))
        yield TaskOutcome(task, tuple(scores))
