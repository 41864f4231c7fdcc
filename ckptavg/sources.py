"""Trajectory sources: where the checkpoint of each training step lives, and how to get it on disk.

A source lists its steps and their sizes without downloading, puts one step's checkpoint on
disk (`fetch`), and frees it again (`evict`). A local trajectory is folders named by step;
fetching and evicting it are no-ops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .tensors import WEIGHT_LAYOUTS

DEFAULT_STEP_PATTERN = r"step(\d+)"


@dataclass
class LocalTrajectory:
    """`root/step1000/`, `root/step2000/`, ... (any names matching `pattern`, whose group 1 is the step)."""

    root: Path
    pattern: str = DEFAULT_STEP_PATTERN
    _folders: dict[int, Path] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no such trajectory folder")
        try:
            regex = re.compile(self.pattern)
        except re.error as e:
            raise InputError(f"bad step pattern {self.pattern!r}: {e}") from None
        for entry in self.root.iterdir():
            m = regex.fullmatch(entry.name)
            if m and entry.is_dir():
                self._folders[int(m.group(1))] = entry
        if not self._folders:
            raise InputError(f"{self.root}: no checkpoint folders matching {self.pattern!r}")

    @property
    def name(self) -> str:
        return self.root.name

    def steps(self) -> list[int]:
        return sorted(self._folders)

    def size(self, step: int) -> int:
        folder = self._folders[step]
        names = {n for n, _ in WEIGHT_LAYOUTS}
        return sum(f.stat().st_size for f in folder.iterdir()
                   if f.suffix in (".safetensors", ".bin") or f.name in names)

    def describe(self, step: int) -> dict:
        return {"source": str(self.root.absolute()), "step": step}

    def fetch(self, step: int) -> Path:
        return self._folders[step]

    def evict(self, step: int) -> None:
        """Local checkpoints belong to the user: never deleted."""
