"""The study file: a whole study (sources x a grid of runs x scoring) as one TOML file, read into types.

    out = "out"                        # outputs: OUT/NAME/TAG/stepN/
    results = "results.sqlite"         # scores (only with [scoring])
    disk_budget = "500GB"              # optional: refuse a plan whose peak disk use is larger
    device = "auto"                    # optional, and dtype, copy = [...], keep_downloads = false,
                                       # output_format = "auto"

    [steps]                            # output steps of every source (a source may override any of them)
    start = 21000
    end = 141000
    interval = 3000

    [[sources]]                        # one of: pythia = "1b" (deduped = true), hub = "ORG/NAME",
    pythia = "1b"                      # local = "runs/x" (any trainer's run folder, or a URL such as
                                       # "s3://bucket/run", with storage_options = {...} for fsspec);
                                       # hub and local take steps_from = 'step(\\d+)' (locally: the
                                       # trainer's layout);
                                       # hub and pythia take cache_dir
    [[runs]]                           # a grid: every list is one axis; scalars are fixed
    method = "lawa"
    k = [2, 5, 10]
    nu = [1000, 2000, 5000, 10000]

    [[runs]]
    method = "ema"                     # ema_alpha = [...]; swa takes swa_start
    k = 5
    nu = 1000
    ema_alpha = 0.9

    [scoring]                          # optional: score originals and averages as the study goes
    tasks = ["pile-philpapers", "lambada_openai"]
    pile = "val.jsonl.zst"             # and ppl_task = ["NAME=FILE"], include_path, limit, batch_size,
    originals = true                   # in_memory = false, fresh_model = false,
                                       # diversity = "text.jsonl" (consecutive window members)

    [tracking]                         # optional, with [scoring]: each score logged as it is stored
    tensorboard = "tb"                 # event files; and/or mlflow = "http://host:5000" (with
    wandb = "my-project"               # mlflow_experiment), wandb (with wandb_entity, wandb_mode)

Relative paths are relative to the study's root: the folder given with `--root`, by default the
current directory. Unknown keys are errors, so that a typo never silently changes a study.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import CkptavgError, OptionError
from ..options import output_tree
from ..report.tracking import Tracking, tracking_from
from ..storage import is_url
from ..trajectory.methods import DEFAULT_DECAY_SHAPE, DEFAULT_EMA_ALPHA, METHODS, check_parameters
from ..trajectory.pythia import PAPER_END, PAPER_INTERVAL, PAPER_START
from ..trajectory.run import RunSpec

TOP_KEYS = {"out", "results", "disk_budget", "device", "dtype", "copy", "keep_downloads", "output_format", "steps",
            "sources", "runs", "scoring", "tracking", "name"}
STEP_KEYS = {"start", "end", "interval"}
SOURCE_KINDS = ("pythia", "hub", "local")
SOURCE_KEYS = {*SOURCE_KINDS, "deduped", "steps_from", "cache_dir", "storage_options", *STEP_KEYS}
RUN_KEYS = {"method", "k", "nu", "ema_alpha", "swa_start", "decay_shape", "skip_incomplete"}
SCORING_KEYS = {"tasks", "pile", "ppl_task", "include_path", "limit", "batch_size", "originals", "in_memory",
                "fresh_model", "diversity"}
PYTHIA_STEPS = {"start": PAPER_START, "end": PAPER_END, "interval": PAPER_INTERVAL}  # the paper's


@dataclass(frozen=True)
class SourceEntry:
    kind: str  # pythia | hub | local
    name: str  # the Pythia size, the repo id or the folder
    steps: dict[str, int]  # start, end, interval (end may be absent for local and hub: the last step)
    deduped: bool = True
    steps_from: str | None = None  # the step pattern; None: step(\d+) on the Hub, the trainer's layout locally
    cache_dir: Path | None = None
    explicit_start: bool = False  # the file gives a start: every run starts there (an error if it cannot)
    # fsspec's options for a `local = "s3://..."` source (an endpoint, a profile); never written anywhere
    storage_options: dict = field(default_factory=dict, repr=False)

    def specs(self, grid: Sequence[dict], available: Sequence[int]) -> list[RunSpec]:
        """The grid's runs on this source. Without an end, runs end at the source's last step. Without a start
        in the file, each run starts at its first full window on the interval grid that begins at the
        default start (Pythia: step 21000; otherwise the source's first step), so that a grid's runs share
        output steps."""
        last = max(available)
        default = self.steps.get("start", PYTHIA_STEPS["start"] if self.kind == "pythia" else min(available))
        interval = self.steps["interval"]

        def start(g: dict) -> int:
            if self.explicit_start:
                return default
            needed = min(available) + (g["k"] - 1) * g["nu"]
            return default + max(0, -(-(needed - default) // interval)) * interval

        return [RunSpec(g["method"], g["k"], g["nu"], interval, start(g), self.steps.get("end", last),
                        g.get("ema_alpha", DEFAULT_EMA_ALPHA), g.get("swa_start"), g.get("skip_incomplete", False),
                        g.get("decay_shape", DEFAULT_DECAY_SHAPE)) for g in grid]


@dataclass(frozen=True)
class StudyFile:
    path: Path
    root: Path
    sources: tuple[SourceEntry, ...]
    grid: tuple[dict, ...]  # one dict per run configuration: method, k, nu, ema_alpha?, swa_start?
    out: Path
    results: Path
    disk_budget: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    copy: tuple[str, ...] = ()
    keep_downloads: bool = False
    scoring: dict[str, Any] = field(default_factory=dict)  # the [scoring] table, paths resolved
    output_format: str = "auto"
    tracking: Tracking = Tracking()  # the [tracking] table


def _unknown(table: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise OptionError(f"{where}: unknown key(s) {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})")


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list) else [value]


def _expand(run: dict, where: str) -> list[dict]:
    """One [[runs]] table -> its configurations: the product of every list-valued key."""
    _unknown(run, RUN_KEYS, where)
    method = run.get("method")
    if method not in METHODS:
        raise OptionError(f"{where}: unknown method {method!r} (choose from {', '.join(METHODS)})")
    keys = [k for k in ("k", "nu", "ema_alpha", "swa_start", "decay_shape") if k in run]
    configs = []
    for values in itertools.product(*(_as_list(run[k]) for k in keys)):
        config = {"method": method, "skip_incomplete": bool(run.get("skip_incomplete", False)),
                  **dict(zip(keys, values, strict=True))}
        for key in ("k", "nu"):
            if not isinstance(config.get(key), int):
                raise OptionError(f"{where}: {key} must be a whole number or a list of them, got {config.get(key)!r}")
        try:
            check_parameters(method, config["k"], config["nu"], 1, config.get("ema_alpha", DEFAULT_EMA_ALPHA),
                             config.get("decay_shape", DEFAULT_DECAY_SHAPE))
        except CkptavgError as e:  # say which table
            raise type(e)(f"{where}: {str(e).replace('--', '')}") from None
        configs.append(config)
    return configs


def load_study(path: str | Path, root: str | Path | None = None) -> StudyFile:
    """Read and check a study file; nothing is listed, fetched or written."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise OptionError(f"{path}: no such study file") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"{path}: not a valid TOML file ({e})") from None
    where = str(path)
    _unknown(raw, TOP_KEYS, where)
    base = Path(root) if root is not None else Path.cwd()

    def resolve(p: str | None) -> Path | None:
        return None if p is None else (base / p if not Path(p).is_absolute() else Path(p))

    steps = raw.get("steps", {})
    _unknown(steps, STEP_KEYS, f"{where} [steps]")
    sources = []
    for i, s in enumerate(raw.get("sources", [])):
        here = f"{where} [[sources]] #{i + 1}"
        _unknown(s, SOURCE_KEYS, here)
        kinds = [k for k in SOURCE_KINDS if k in s]
        if len(kinds) != 1:
            raise OptionError(f"{here}: give exactly one of {', '.join(SOURCE_KINDS)}")
        kind = kinds[0]
        own = {k: s[k] for k in STEP_KEYS if k in s}
        merged = (PYTHIA_STEPS if kind == "pythia" else {}) | steps | own
        explicit_start = "start" in steps or "start" in own
        if "interval" not in merged:
            raise OptionError(f"{here}: no output interval (set [steps] interval, or interval here)")
        name = str(resolve(s[kind])) if kind == "local" and not is_url(s[kind]) else str(s[kind])
        options = s.get("storage_options", {})
        if not isinstance(options, dict) or (options and not (kind == "local" and is_url(name))):
            raise OptionError(f"{here}: storage_options is a table, for a local source given as a URL")
        sources.append(SourceEntry(kind, name, merged, bool(s.get("deduped", True)), s.get("steps_from"),
                                   resolve(s.get("cache_dir")), explicit_start, options))
    if not sources:
        raise OptionError(f"{where}: no [[sources]]")
    grid = [c for i, r in enumerate(raw.get("runs", [])) for c in _expand(r, f"{where} [[runs]] #{i + 1}")]
    if not grid:
        raise OptionError(f"{where}: no [[runs]]")
    scoring = dict(raw.get("scoring", {}))
    _unknown(scoring, SCORING_KEYS, f"{where} [scoring]")
    for key in ("pile", "diversity"):
        if key in scoring:
            scoring[key] = resolve(scoring[key])
    scoring["include_path"] = [resolve(p) for p in scoring.get("include_path", [])]
    scoring["ppl_task"] = [f"{n}={resolve(f)}" if f else t
                           for t, (n, _, f) in ((t, t.partition("=")) for t in scoring.get("ppl_task", []))]
    out = output_tree(raw.get("out", "out"), f"{where} out =",
                      needs_filesystem="a study (its results store, locks and job logs)")
    try:
        tracking = tracking_from(dict(raw.get("tracking", {})))
    except CkptavgError as e:
        raise OptionError(f"{where} {e}") from None
    if tracking.tensorboard is not None:
        tracking = replace(tracking, tensorboard=resolve(str(tracking.tensorboard)))
    if tracking and not scoring.get("tasks"):
        raise OptionError(f"{where}: [tracking] logs scores: give [scoring] tasks")
    return StudyFile(path, base, tuple(sources), tuple(grid),
                     resolve(str(out)), resolve(raw.get("results", "results.sqlite")),
                     raw.get("disk_budget"), raw.get("device", "auto"), raw.get("dtype", "auto"),
                     tuple(raw.get("copy", ())), bool(raw.get("keep_downloads", False)), scoring,
                     str(raw.get("output_format", "auto")), tracking)
