"""Parsing and printing of byte sizes, with the Hub's conventions (GB = 10**9, GiB = 2**30)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; '500MiB' -> 524_288_000; a plain number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MiB, 1000000)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


_TOKEN_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_tokens(text: str) -> int:
    """'4B' -> 4_000_000_000; '500M', '2.5T', a plain count. Decimal units, as pre-training papers count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]?)\s*", str(text))
    if not m or m.group(2).upper() not in _TOKEN_UNITS:
        raise ValueError(f"not a token count: {text!r} (examples: 4B, 500M, 2097152000)")
    value = round(float(m.group(1)) * _TOKEN_UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"token count must be positive: {text!r}")
    return value


def format_tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"
