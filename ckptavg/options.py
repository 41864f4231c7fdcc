"""Parsing and validation of option values, without torch and without touching the network or disk.

Every command parses all of its options through these functions first, so that a typo in the
last option fails in a second, with one line, before the Hub is listed or a byte is fetched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .errors import OptionError
from .storage.base import is_url
from .storage.paths import RemotePath, location
from .units import parse_size, parse_tokens

# Output dtypes of averaged tensors; "auto" keeps the dtype stored in the newest input.
AVERAGE_DTYPES = ("auto", "float16", "bfloat16", "float32", "float64")
# Output formats (checkpoints/formats.py; a test holds the two lists equal);
# "auto": the inputs' own where ckptavg writes it (DCP), else safetensors.
OUTPUT_FORMATS = ("auto", "safetensors", "dcp", "torch")
# Accumulation; "auto": float32 for 16-bit inputs, float64 for float32 ones (the sum exact either way).
ACCUMULATE_DTYPES = ("auto", "float32", "float64")
# Model dtypes for scoring; "auto": float32 on a CPU, as stored on a GPU.
EVAL_DTYPES = ("auto", "float16", "bfloat16", "float32")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def choice(value: str, allowed: Sequence[str], option: str) -> str:
    if value not in allowed:
        raise OptionError(f"{option}: unknown value {value!r} (choose from {', '.join(allowed)})")
    return value


def device(value: str, option: str = "--device") -> str:
    """Syntax only; whether a CUDA device is there is `average.resolve_device`'s question."""
    if not _DEVICE.fullmatch(value):
        raise OptionError(f"unsupported device {value!r} for {option} (use auto, cpu, cuda or cuda:N)")
    return value


def size(text: str, option: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise OptionError(f"{option}: {e}") from None


def tokens(text: str, option: str) -> int:
    try:
        return parse_tokens(text)
    except ValueError as e:
        raise OptionError(f"{option}: {e}") from None


def floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"{option} must be comma-separated numbers, got {text!r}") from None


def ints(text: str, option: str) -> set[int]:
    try:
        return {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise OptionError(f"{option} must be comma-separated integers, got {text!r}") from None


def named_files(items: Sequence[str], option: str) -> dict[str, Path]:
    """NAME=FILE pairs; every file must exist."""
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise OptionError(f"{option} takes NAME=FILE, got {item!r}")
        if not Path(path).is_file():
            raise OptionError(f"{option} {item}: no such file {path}")
        named[name] = Path(path)
    return named


def duration(text: str, option: str) -> float:
    """Seconds, from `90`, `90s`, `30m` or `2h`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise OptionError(f"{option}: {text!r} is no duration (like 90s, 30m, 2h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def output_tree(text: str | Path | RemotePath, option: str, *, needs_filesystem: str | None = None
                ) -> Path | RemotePath:
    """The folder (or a store's prefix) a run puts its outputs and run log under. A store takes averages
    alone; `needs_filesystem` names what else the run keeps there, which a store cannot hold (scoring loads
    each output from a filesystem, a follower keeps the steps it needs, a study its results store, locks
    and job logs): then a URL is an `OptionError`."""
    if isinstance(text, RemotePath) or is_url(str(text)):
        if needs_filesystem:
            raise OptionError(f"{option} {text}: {needs_filesystem} writes to a filesystem (local or shared); "
                              f"averages alone go to a store")
        return location(text)
    return Path(text)


def existing_file(path: Path | None, option: str) -> Path | None:
    if path is not None and not Path(path).is_file():
        raise OptionError(f"{option}: no such file {path}")
    return path


def existing_dirs(paths: Sequence[Path], option: str) -> list[Path]:
    for p in paths:
        if not Path(p).is_dir():
            raise OptionError(f"{option}: no such folder {p}")
    return list(paths)


def tasks(text: str) -> list[str]:
    found = [t.strip() for t in text.split(",") if t.strip()]
    if not found:
        raise OptionError("--tasks is empty")
    return found


def limit(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise OptionError(f"--limit must be at least 1, got {value}")
    return value


def batch_size(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) > 0):
        raise OptionError(f"--batch-size must be auto or a positive integer, got {value!r}")
    return value


def copy_patterns(patterns: Sequence[str]) -> tuple[str, ...]:
    """--copy PATTERN: fnmatch patterns of tensor names to copy from the newest input, never average."""
    for p in patterns:
        if not p.strip():
            raise OptionError("--copy takes a non-empty pattern, e.g. '*.attn.masked_bias'")
    return tuple(patterns)


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def image_file(path: Path, option: str) -> Path:
    if Path(path).suffix.lower() not in PLOT_SUFFIXES:
        raise OptionError(f"{option} {path}: the file name must end in one of {', '.join(PLOT_SUFFIXES)}")
    return path
