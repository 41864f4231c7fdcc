"""Following a run while it trains: each window averaged as soon as its newest member is complete, and the
members a later window needs kept from the trainer's deletions.

A step counts only once it is complete: its checkpoint opens (every safetensors header whole and every
tensor's bytes within its file, an index's shards all there, DCP's `.metadata` written, transformers'
`trainer_state.json` there) and its files' sizes and modification times have not changed since the
previous scan (a save still trickling in is not complete). Complete steps that a window still to be done
needs are kept: hard-linked (a copy where the link is refused) into a folder of ckptavg's own,
`OUT/NAME/.ckptavg-kept/`, under their own names, so the trainer deleting its old checkpoints
(`save_total_limit`, `max_checkpoints`) takes nothing from a window. The windows are averaged from that
folder, as a local trajectory, by the same plan and run as without `--follow`; kept steps no window needs
any more are released. A window one of whose members was gone before it could be kept is reported once
and skipped.

A run on an object store is followed the same way (its objects' sizes and ETags for the signature). Its
steps are read in place, by range; they are kept (downloaded) only within a disk budget, which also
bounds the copies of local steps that cannot be hard-linked. A Hub repo whose trainer pushes each
checkpoint as a branch is listed again each time round (`FollowedRepo`); a branch is complete once it
exists, and the revisions a later window needs stay in the Hugging Face cache between rounds.

`needed_steps` is the pure rule; `Scanner`, `Keeper`, `Followed`, `FollowedRepo` and `follow` do the I/O.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..checkpoints.layouts import checkpoint_in, detect_pattern, last_file_missing, unfinished
from ..errors import CkptavgError, CkptavgWarning, InputError
from ..manifest import Provenance
from ..storage.paths import RemotePath, location
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


def _signature(path: Path | RemotePath) -> tuple:
    """Every file of a checkpoint with its size and version: a local file's modification time, an object's
    ETag (a store's object appears whole, but a save may still be adding objects)."""
    if isinstance(path, RemotePath):
        return tuple((p, i.size, i.identity) for p, i in path.storage.find(path.path).items())
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
            if before != signature or unfinished(checkpoint) or last_file_missing(self.root / name):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    open_checkpoint(checkpoint)
            except (CkptavgError, OSError):
                continue  # not whole yet (a header longer than its file, an index without its shards)
            self.complete[step] = name
        return dict(self.complete)


def complete_steps(root: Path | RemotePath, pattern: str | None = None) -> list[int]:
    """The steps complete now (two scans that find them the same), for a follower's first window."""
    scanner = Scanner(location(root), pattern)
    scanner.scan()
    return sorted(scanner.scan())


class Keeper:
    """Kept steps: `OUT/NAME/.ckptavg-kept/<the step's own name>`, each appearing whole (built under a
    temporary name, then renamed). A local step is hard-linked (a copy where the link is refused); a step
    on an object store is downloaded, and only with a disk budget (without one it is read in place). The
    kept copies, those of their files that no other link holds, stay within `budget` bytes."""

    def __init__(self, folder: Path, budget: int | None = None) -> None:
        self.folder, self.budget = folder, budget
        self.refused: set[str] = set()  # steps not kept for the budget, said once each

    def steps(self, pattern: str) -> dict[int, str]:
        if not self.folder.is_dir():
            return {}
        return step_branches([e.name for e in self.folder.iterdir() if not e.name.startswith(".")], pattern,
                             str(self.folder))

    def cost(self) -> int:
        """Bytes of disk the kept steps hold on their own (a file whose trainer's copy is gone counts)."""
        if not self.folder.is_dir():
            return 0
        return sum(st.st_size for p in self.folder.rglob("*") if p.is_file() and (st := p.stat()).st_nlink == 1)

    def keep(self, source: Path | RemotePath) -> bool:
        """Keep a step; False when it is not kept (a store's step without a budget, or over the budget)."""
        remote = isinstance(source, RemotePath)
        if remote and self.budget is None:
            return False
        objects = source.storage.find(source.path) if remote else None
        if remote and self.cost() + sum(i.size for i in objects.values()) > self.budget:
            return self._refuse(source)
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / source.name
        tmp = self.folder / f".{source.name}.{os.getpid()}.tmp"
        _remove(tmp)
        try:
            if remote:
                source.storage.download(source.path, tmp, objects)
            elif source.is_file():
                _link_or_copy(source, tmp)
            else:
                shutil.copytree(source, tmp, copy_function=_link_or_copy)
            if self.budget is not None and self.cost() > self.budget:  # copies, where links were refused
                _remove(tmp)
                return self._refuse(source)
            os.rename(tmp, final)
        except (FileNotFoundError, InputError):  # deleted by the trainer while it was being kept
            _remove(tmp)
            return False
        return True

    def _refuse(self, source) -> bool:
        if source.name not in self.refused:
            self.refused.add(source.name)
            warnings.warn(f"{source} not kept: a copy would pass the --disk-budget of {self.budget} bytes "
                          f"(it is read in place; if the trainer deletes it first, its windows are skipped)",
                          CkptavgWarning, stacklevel=3)
        return False

    def release(self, name: str) -> None:
        _remove(self.folder / name)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


class KeptTrajectory(LocalTrajectory):
    """A round's steps, each kept by ckptavg or where the trainer put it (a store's step read in place), as a
    local trajectory named and described as the trainer's run."""

    def __init__(self, entries: dict[int, Path | RemotePath], pattern: str, origin: Path | RemotePath) -> None:
        self.root, self.pattern, self.origin = origin, pattern, origin
        self._names = {step: entry.name for step, entry in entries.items()}
        self._folders = {step: checkpoint_in(entry) for step, entry in entries.items()}

    def describe(self, step: int) -> Provenance:
        return Provenance(str(self.origin.absolute()), step)


@dataclass(frozen=True)
class FollowOptions:
    until: int | None = None  # stop once every window up to this output step is done
    idle_timeout: float | None = None  # stop after this many seconds without a new complete step
    poll: float = 30.0  # the longest pause between scans (they start at 1 s and double while nothing changes)


class _Following:
    """What following one source shares, whatever the source: the windows still to do and the steps they
    need, each lost window reported once, and the specs due for a round."""

    keep_fetched = False  # whether a round keeps what it fetched (a later round's windows may need it)

    def __init__(self, specs: Sequence[RunSpec], run_round: Callable, finished: Callable[[RunSpec, Window], bool],
                 events: Events) -> None:
        self.specs, self.run_round, self.finished, self.events = list(specs), run_round, finished, events
        self.reported: set[tuple[str, int]] = set()
        self.seen: set[int] = set()  # complete steps found so far: a new one, needed or not, means the run goes on
        self.rounds = 0

    def _needed(self, latest: int | None, have: set[int], until: int | None) -> set[int]:
        """The steps a window still to do needs; windows lost for good are reported (once)."""
        needed: set[int] = set()
        for spec in self.specs:
            steps, lost = needed_steps(spec, latest, have, lambda w, spec=spec: self.finished(spec, w), until)
            needed |= steps
            for w in lost:
                if (spec.tag(), w.step) not in self.reported:
                    self.reported.add((spec.tag(), w.step))
                    self.events.lost(spec.tag(), w)
        return needed

    def _round(self, source, latest: int | None, until: int | None, new: bool) -> None:
        reachable = latest if until is None else min(latest or 0, until)
        due = [replace(spec, end=reachable, skip_incomplete=True) for spec in self.specs
               if latest is not None and reachable >= spec.start]
        if (new or not self.rounds) and due:
            self.run_round(source, due, self.keep_fetched)
            self.rounds += 1

    def _seen(self, complete: set[int], needed: set[int], latest: int | None, until: int | None) -> tuple[bool, bool]:
        done = until is not None and not needed and latest is not None and latest >= until
        found = bool(complete - self.seen)
        self.seen |= complete
        return found, done


class Followed(_Following):
    """One run folder (local, or a prefix on an object store) followed for one or more runs (a study's grid):
    scan, keep what a window still to do needs, average each round (`run_round(kept trajectory, specs up to
    the latest step)`), release."""

    def __init__(self, root: Path | RemotePath, specs: Sequence[RunSpec], out: Path,
                 run_round: Callable[[KeptTrajectory, list[RunSpec], bool], object],
                 finished: Callable[[RunSpec, Window], bool], pattern: str | None = None,
                 events: Events = QUIET, disk_budget: int | None = None) -> None:
        super().__init__(specs, run_round, finished, events)
        self.root = location(root)
        if not self.root.is_dir():
            raise InputError(f"{root}: no such run folder")
        self.scanner = Scanner(self.root, pattern)
        self.keeper = Keeper(Path(out) / self.root.name / KEPT, disk_budget)

    def step(self, until: int | None) -> tuple[bool, bool]:
        """One scan and, when there is something new, one round: (a new complete step was found, every window
        up to `until` is done)."""
        complete = self.scanner.scan()
        pattern = self.scanner.pattern
        kept = self.keeper.steps(pattern) if pattern else {}
        have = set(complete) | set(kept)
        latest = max(have, default=None)
        needed = self._needed(latest, have, until)
        for step in sorted(needed & set(complete) - set(kept)):
            self.keeper.keep(self.root / complete[step])
        kept = self.keeper.steps(pattern) if pattern else {}
        entries = {step: self.root / name for step, name in complete.items()} | {
            step: self.keeper.folder / name for step, name in kept.items()}
        if entries:
            self._round(KeptTrajectory(entries, pattern, self.root), latest, until,
                        bool(needed & (set(complete) - self.seen)))
        needed = self._needed(latest, have, until)  # (less what this round did)
        for step, name in kept.items():
            if step not in needed:
                self.keeper.release(name)
        return self._seen(set(complete), needed, latest, until)


class FollowedRepo(_Following):
    """A Hub repo whose trainer pushes each checkpoint as a branch: a branch is complete once it exists (a
    Hub commit is atomic), and its revision is fetched, averaged and evicted as without --follow. Branches
    are not kept: one deleted before its windows are done loses them. A revision a later window needs stays
    in the Hugging Face cache between rounds; the others are deleted after each round, as without --follow."""

    keep_fetched = True

    def __init__(self, source, specs: Sequence[RunSpec], run_round: Callable, finished: Callable[[RunSpec, Window],
                 bool], events: Events = QUIET) -> None:
        super().__init__(specs, run_round, finished, events)
        self.source = source  # a HubTrajectory
        self.root = source.repo_id

    def step(self, until: int | None) -> tuple[bool, bool]:
        self.source.refresh()
        have = set(self.source.steps())
        latest = max(have, default=None)
        needed = self._needed(latest, have, until)
        self._round(self.source, latest, until, bool(needed & (have - self.seen)))
        needed = self._needed(latest, have, until)
        self.source.evict_leftovers(needed & have)
        return self._seen(have, needed, latest, until)


def follow(followed: Sequence[Followed], options: FollowOptions = FollowOptions()) -> int:
    """Step every followed folder, then wait; until `options` says stop. Returns how many rounds ran. Ctrl-C
    (or SIGTERM, which the CLI turns into it) during a pause stops at once; during an average, after the
    average is cleaned up."""
    pause, idle_since = 1.0, time.monotonic()
    while True:
        steps = [f.step(options.until) for f in followed]
        if options.until is not None and all(done for _, done in steps):
            return sum(f.rounds for f in followed)
        if any(found for found, _ in steps):
            pause, idle_since = 1.0, time.monotonic()
        elif options.idle_timeout is not None and time.monotonic() - idle_since >= options.idle_timeout:
            names = ", ".join(str(f.root) for f in followed)
            warnings.warn(f"no new checkpoint in {options.idle_timeout:g} s: stopped following {names}",
                          CkptavgWarning, stacklevel=2)
            return sum(f.rounds for f in followed)
        time.sleep(pause)
        pause = min(pause * 2, options.poll)
