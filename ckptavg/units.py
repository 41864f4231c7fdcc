"""Parsing and printing of byte sizes, with the Hub's conventions (GB = 10**9, GiB = 2**30), and of token
counts, with pre-training papers' (4B = 4 * 10**9)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _count(text: str, units: dict[str, int], what: str, examples: str) -> int:
    """A positive whole number written as a number and an optional unit (case-insensitive)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units:
        raise ValueError(f"not a {what}: {text!r} (examples: {examples})")
    value = round(float(m.group(1)) * units[m.group(2).upper()])  # 2.097152B is 2097152000, not 1 less
    if value <= 0:
        raise ValueError(f"{what} must be positive: {text!r}")
    return value


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; '500MiB' -> 524_288_000; a plain number is bytes."""
    return _count(text, _UNITS, "size", "5GB, 500MiB, 1000000")


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


_TOKEN_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_tokens(text: str) -> int:
    """'4B' -> 4_000_000_000; '500M', '2.5T', a plain count. Decimal units, as pre-training papers count."""
    return _count(text, _TOKEN_UNITS, "token count", "4B, 500M, 2097152000")


def format_tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"
