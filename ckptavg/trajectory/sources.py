"""Trajectory sources: where the checkpoint of each training step lives, and how to get it on disk.

A source lists its steps and their sizes without downloading, puts one step's checkpoint on
disk (`fetch`), and frees it again (`evict`). A local trajectory is folders named by step;
fetching and evicting it are no-ops. The Hub source lives in `hub.py`; the pure rules both
share (step names, which revisions are suspiciously identical) live here, and which files make
a checkpoint in `checkpoints/names.py`.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints.layouts import STEP_PATTERNS, checkpoint_in, detect_pattern, unfinished
from ..checkpoints.names import weight_files
from ..errors import CkptavgWarning, InputError
from ..manifest import Provenance
from ..storage.paths import RemotePath, location


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise InputError(f"bad step pattern {pattern!r}: {e}") from None
    if regex.groups < 1:
        raise InputError(f"step pattern {pattern!r} needs a group for the step number, like 'step(\\d+)'")
    return regex


def step_branches(names: Iterable[str], pattern: str, where: str) -> dict[int, str]:
    """step -> name, for the names that fully match `pattern`; two names for one step is an error."""
    regex = compile_pattern(pattern)
    steps: dict[int, str] = {}
    for name in sorted(names):
        m = regex.fullmatch(name)
        if not m:
            continue
        step = int(m.group(1))
        if step in steps:
            raise InputError(f"{where}: {steps[step]!r} and {name!r} both match {pattern!r} as step {step}")
        steps[step] = name
    return steps


@dataclass(frozen=True)
class Duplicate:
    """Revisions that should differ but share weight files byte for byte."""

    revisions: tuple[str, ...]
    files: tuple[str, ...]  # the shared file names, as named in the first revision

    def __str__(self) -> str:
        shown = ", ".join(self.files[:3]) + (f" and {len(self.files) - 3} more" if len(self.files) > 3 else "")
        return f"{', '.join(self.revisions)} share weights byte for byte ({shown})"


def find_duplicates(blobs: Mapping[str, Mapping[str, str]], steps: Mapping[str, int],
                    planned: Iterable[str]) -> list[Duplicate]:
    """Groups of revisions, each touching `planned`, whose weight files have equal sha256.

    `blobs` maps revision -> {file name: sha256}; `steps` maps the step revisions to their
    step. Two step revisions never should share a file. A non-step revision (`main`) should
    only equal the last step: anything else it equals is reported too.
    """
    last = max(steps.values(), default=None)
    parent = {r: r for r in blobs}

    def root(r: str) -> str:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    owners: dict[str, list[tuple[str, str]]] = {}
    for rev, files in blobs.items():
        for name, sha in files.items():
            owners.setdefault(sha, []).append((rev, name))
    shared: dict[str, set[str]] = {}
    for holders in owners.values():
        for i, (a, name) in enumerate(holders):
            for b, _ in holders[i + 1:]:
                sa, sb = steps.get(a), steps.get(b)
                if sa is None and sb is None or {sa, sb} == {None, last}:
                    continue  # main and the last step are meant to be equal
                parent[root(a)] = root(b)
                shared.setdefault(a, set()).add(name)
                shared.setdefault(b, set()).add(name)
    groups: dict[str, list[str]] = {}
    for rev in shared:
        groups.setdefault(root(rev), []).append(rev)
    planned = set(planned)
    order = lambda r: (steps.get(r) is None, steps.get(r, 0), r)  # noqa: E731
    found = []
    for members in groups.values():
        if planned & set(members):
            members.sort(key=order)
            found.append(Duplicate(tuple(members), tuple(sorted(shared[members[0]]))))
    return sorted(found, key=lambda d: order(d.revisions[0]))


@dataclass
class LocalTrajectory:
    """`root/step1000/`, `root/step2000/`, ... (any names matching `pattern`, whose group 1 is the step;
    by default the pattern of the trainer layout the names show, `checkpoints/layouts.py`). A step is a
    folder or a file (Lightning's `.ckpt`); one still being written is left out, with a warning."""

    root: Path
    pattern: str | None = None
    _folders: dict[int, Path] = field(default_factory=dict, init=False, repr=False)
    _names: dict[int, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = location(self.root)  # a local folder, or a prefix on an object store
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no such trajectory folder")
        entries = [e.name for e in self.root.iterdir()]
        if self.pattern is None:
            self.pattern = detect_pattern(entries)
            if self.pattern is None:
                known = ", ".join(p for _, p in STEP_PATTERNS)
                raise InputError(f"{self.root}: no checkpoints named as a trainer names its steps ({known}); "
                                 f"give the pattern of yours (--steps-from)")
        names = step_branches(entries, self.pattern, str(self.root))
        for step, name in list(names.items()):
            why = unfinished(checkpoint_in(self.root / name))
            if why:
                warnings.warn(f"step {step} left out: {why}", CkptavgWarning, stacklevel=2)
                del names[step]
        self._names = names  # step -> the step's entry in root
        self._folders = {step: checkpoint_in(self.root / name) for step, name in names.items()}
        if not self._folders:
            raise InputError(f"{self.root}: no finished checkpoints matching {self.pattern!r}")

    local = True  # read in place: nothing to download, nothing to delete

    @property
    def name(self) -> str:
        return self.root.name

    def steps(self) -> list[int]:
        return sorted(self._folders)

    def _weight_files(self, step: int) -> list[Path]:
        folder = self._folders[step]
        if folder.is_file():
            return [folder]
        return sorted(folder / n for n in weight_files(e.name for e in folder.iterdir() if e.is_file()))

    def size(self, step: int) -> int:
        return sum(f.stat().st_size for f in self._weight_files(step))

    def label(self, step: int) -> str:
        return str(self._folders[step])

    def describe(self, step: int) -> Provenance:
        return Provenance(str(self.root.absolute()), step)

    def fetch(self, step: int) -> Path:
        return self._folders[step]

    def evict(self, step: int) -> None:
        """Local checkpoints belong to the user: never deleted."""

    def evict_leftovers(self, keep: set[int]) -> list[str]:
        return []

    def release(self) -> None:
        pass

    def disk_usage(self) -> int:
        return 0

    missing_hint = ""

    def duplicates(self, steps: list[int], read_data: bool = True) -> list[Duplicate]:
        """Weight files that are byte-identical across steps. Cheap: sizes first, then a sampled
        fingerprint (9 small reads a file), and a full sha256 (cached, and reused by the manifests)
        only for files whose fingerprints collide. `read_data=False` (a dry run) reads nothing."""
        from ..hashing import file_sha256, sample_fingerprint

        if not read_data:
            return []
        files = {s: self._weight_files(s) for s in steps}
        sizes = {f: f.stat().st_size for fs in files.values() for f in fs}
        same_size = Counter(sizes.values())
        # (an object's ETag is its content's checksum on most stores: equal objects show it without a read)
        keys = {f: f"object:{f.info().identity}" if isinstance(f, RemotePath) else
                sample_fingerprint(f) if same_size[n] > 1 else f"size:{n}" for f, n in sizes.items()}
        collisions = Counter(keys.values())
        for f, key in keys.items():
            if collisions[key] > 1:
                keys[f] = file_sha256(f)[0]
        blobs = {self._names[s]: {f.name: keys[f] for f in fs} for s, fs in files.items()}
        return find_duplicates(blobs, {self._names[s]: s for s in steps}, blobs)
