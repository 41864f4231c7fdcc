"""Following a run while it trains: each window averaged as soon as its newest member is complete, and
the members a later window needs kept from the trainer's deletions.

A step counts only once it is complete: its checkpoint opens (every safetensors header whole and every
tensor's bytes within its file, an index's shards all there, DCP's `.metadata` written) and its files'
sizes and modification times have not changed since the previous scan (a save still trickling in is not
complete). Complete steps that a window still to be done needs are kept: hard-linked (a copy where the
link is refused) into a folder of ckptavg's own, `OUT/NAME/.ckptavg-kept/`, under their own names, so the
trainer deleting its old checkpoints (`save_total_limit`, `max_checkpoints`) takes nothing from a window.
The windows are averaged from that folder, as a local trajectory, by the same plan and run as without
`--follow`; kept steps no window needs any more are released. A window one of whose members was gone
before it could be kept is reported once and skipped.

`needed_steps` is the pure rule; `Scanner`, `Keeper` and `follow` do the I/O.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..checkpoints.layouts import checkpoint_in, detect_pattern, unfinished
from ..errors import CkptavgError, CkptavgWarning, InputError
from .events import QUIET, Events
from .run import RunSpec
from .schedule import Window
from .sources import LocalTrajectory, step_branches

KEPT = ".ckptavg-kept"


def needed_steps(spec: RunSpec, latest: int | None, have: set[int], finished: Callable[[Window], bool],
                 until: int | None = None) -> tuple[set[int], list[Window]]:
    """(the steps a window still to be done needs, the windows that can never be done): every window up to
    one interval past the latest step's reach, less the finished ones; a window is lost when a member at or
    before `latest` is not in `have` (the trainer deleted it, or never saved it)."""
    reach = (latest if latest is not None else spec.start) + (spec.k - 1) * spec.nu + spec.interval
    end = max(reach, spec.start) if until is None else min(max(reach, spec.start), until)
    if end < spec.start:
        return set(), []
    needed: set[int] = set()
    lost = []
    for w in replace(spec, end=end, skip_incomplete=False).windows(None):
        if finished(w):
            continue
        if latest is not None and any(s <= latest and s not in have for s in w.members):
            lost.append(w)
            continue
        needed.update(w.members)
    return needed, lost


def _signature(path: Path) -> tuple:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in files)


@dataclass
class Scanner:
    """The complete steps of a trainer's run folder, scan after scan."""

    root: Path
    pattern: str | None = None
    _seen: dict[int, tuple] = field(default_factory=dict)  # step -> its files' signature at the last scan
    complete: dict[int, str] = field(default_factory=dict)  # step -> its entry's name, once complete

    def scan(self) -> dict[int, str]:
        from ..checkpoints.open import open_checkpoint

        entries = [e.name for e in self.root.iterdir() if not e.name.startswith(".")]
        if self.pattern is None:
            self.pattern = detect_pattern(entries)
            if self.pattern is None:
                return {}  # nothing saved yet
        steps = step_branches(entries, self.pattern, str(self.root))
        for step in [s for s in self.complete if s not in steps]:
            del self.complete[step]  # deleted by the trainer
        for step, name in steps.items():
            if step in self.complete:
                continue
            checkpoint = checkpoint_in(self.root / name)
            try:
                signature = _signature(checkpoint)
            except OSError:
                continue  # changing under the scan
            before, self._seen[step] = self._seen.get(step), signature
            if before != signature or unfinished(checkpoint):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    open_checkpoint(checkpoint)
            except (CkptavgError, OSError):
                continue  # not whole yet (a header longer than its file, an index without its shards)
            self.complete[step] = name
        return dict(self.complete)


class Keeper:
    """Kept steps: `OUT/NAME/.ckptavg-kept/<the step's own name>`, each appearing whole (built under a
    temporary name, then renamed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def steps(self, pattern: str) -> dict[int, str]:
        if not self.folder.is_dir():
            return {}
        return step_branches([e.name for e in self.folder.iterdir() if not e.name.startswith(".")], pattern,
                             str(self.folder))

    def keep(self, source: Path) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / source.name
        tmp = self.folder / f".{source.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if source.is_file():
                _link_or_copy(source, tmp)
            else:
                shutil.copytree(source, tmp, copy_function=_link_or_copy)
            os.rename(tmp, final)
        except FileNotFoundError:  # deleted by the trainer while it was being kept
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.unlink(missing_ok=True)

    def release(self, name: str) -> None:
        path = self.folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


class KeptTrajectory(LocalTrajectory):
    """The kept steps as a local trajectory, named and described as the trainer's run they came from."""

    def __init__(self, folder: Path, pattern: str, origin: Path) -> None:
        self.origin = origin
        super().__init__(folder, pattern)

    @property
    def name(self) -> str:
        return self.origin.name

    def describe(self, step: int) -> dict:
        return {"source": str(self.origin.absolute()), "step": step}


@dataclass(frozen=True)
class FollowOptions:
    until: int | None = None  # stop once every window up to this output step is done
    idle_timeout: float | None = None  # stop after this many seconds without a new complete step
    poll: float = 30.0  # the longest pause between scans (they start at 1 s and double while nothing changes)


def follow(root: Path, spec: RunSpec, out: Path, run_round: Callable[[KeptTrajectory, RunSpec], object],
           finished: Callable[[Window], bool], options: FollowOptions = FollowOptions(), pattern: str | None = None,
           events: Events = QUIET) -> int:
    """Scan, keep, average (`run_round(kept trajectory, spec up to the latest step)`), release, wait; until
    `options` says stop. Returns how many rounds it ran. Ctrl-C (or SIGTERM, which the CLI turns
    into it) during a pause stops at once; during an average, after the average is cleaned up."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such run folder")
    scanner = Scanner(root, pattern)
    keeper = Keeper(out / root.name / KEPT)
    reported: set[int] = set()
    seen: set[int] = set()  # complete steps found so far: a new one, needed or not, means the run goes on
    pause, idle_since, rounds = 1.0, time.monotonic(), 0
    while True:
        complete = scanner.scan()
        kept = keeper.steps(scanner.pattern) if scanner.pattern else {}
        have = set(complete) | set(kept)
        latest = max(have, default=None)
        needed, lost = needed_steps(spec, latest, have, finished, options.until)
        new = False
        for step in sorted(needed & set(complete) - set(kept)):
            keeper.keep(root / complete[step])
            new = True
        kept = keeper.steps(scanner.pattern) if scanner.pattern else {}
        for w in lost:
            if w.step not in reported:
                reported.add(w.step)
                events.lost(w)
        reachable = latest if options.until is None else min(latest or 0, options.until)
        if (new or not rounds) and kept and latest is not None and reachable >= spec.start:
            run_round(KeptTrajectory(keeper.folder, scanner.pattern, root),
                      replace(spec, end=reachable, skip_incomplete=True))
            rounds += 1
        needed, _ = needed_steps(spec, latest, have, finished, options.until)  # (less what this round did)
        for step, name in kept.items():
            if step not in needed:
                keeper.release(name)
        if options.until is not None and not needed and latest is not None and latest >= options.until:
            return rounds
        if new or set(complete) - seen:
            seen |= set(complete)
            pause, idle_since = 1.0, time.monotonic()
        elif options.idle_timeout is not None and time.monotonic() - idle_since >= options.idle_timeout:
            warnings.warn(f"no new checkpoint in {options.idle_timeout:g} s: stopped following {root}",
                          CkptavgWarning, stacklevel=2)
            return rounds
        time.sleep(pause)
        pause = min(pause * 2, options.poll)
