"""Input files hashed in a forked process while the command that averages them imports torch.

`import torch` takes 1-2 s of one core here before an average can begin, and the other core is idle
meanwhile, while sha256 is the hashed average's largest cost (5-7 s of CPU for 10 GB). So `ckptavg
average` forks, before it imports torch, a child that hashes the weight files it expects to read (found
by name), whole, one after another. When the engine is about to hash, it `claim`s them: the child stops
after the file it is in and says which files it finished; the engine hashes the others from the bytes
it reads, as always, and takes the child's last file at the end (`Claim.finish`). A process, not a
thread: a thread shares the interpreter's lock with the import, and hashed 0.86 GB in the import's time.

A child hashes only files in the page cache (one on disk is the engine's, to read once, direct), and
nothing it hashed is taken unless the file is still the one it hashed (same size, mtime and inode). It
stops when told, and at once when its parent is gone.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .hashing import FileHasher, cache_key, file_sha256, known_sha256
from .storage.pagecache import MOSTLY_CACHED, cached_share
from .storage.paths import RemotePath

STEP = 16 * 1024 * 1024  # hashed between two looks at the stop pipe (about 10 ms)


@dataclass
class _Child:
    pid: int
    files: list[Path]  # resolved, in the order the child hashes them
    keys: dict[Path, str]  # each file's (path, size, mtime, inode) at the fork
    stop: int  # the pipe the parent writes to: one byte to stop, closed when it is gone
    results: TextIO  # the child's lines: "done I SHA256", then "own I" or "own -" once told

    def unchanged(self, path: Path) -> bool:
        """Whether `path` is still the file the child was given: what it hashed of another is not taken."""
        return cache_key(path) == self.keys[path.resolve()]

    def end(self) -> None:
        self.results.close()
        os.waitpid(self.pid, 0)


_running: _Child | None = None


def start(files: Sequence[Path]) -> None:
    """Fork a child hashing `files` (those not hashed already), unless this process cannot fork safely:
    torch is imported (its threads and the fork do not mix), or any other thread runs."""
    global _running
    if _running is not None or "torch" in sys.modules or threading.active_count() > 1 or not hasattr(os, "fork"):
        return
    todo = list(dict.fromkeys(f.resolve() for f in files if f.is_file() and known_sha256(f) is None))
    if not todo:
        return
    keys = {f: cache_key(f) for f in todo}
    stop_r, stop_w = os.pipe()
    results_r, results_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing of the parent's runs here, not even its exit handlers
        status = 1
        try:
            os.close(stop_w)
            os.close(results_r)
            quiet = os.open(os.devnull, os.O_RDWR)  # nor holds its terminal or pipes: `ckptavg ... | tee` ends
            for fd in (0, 1, 2):  # when the command does
                os.dup2(quiet, fd)
            _hash_until_told(todo, stop_r, results_w)
            status = 0
        finally:
            os._exit(status)
    os.close(stop_r)
    os.close(results_w)
    _running = _Child(pid, todo, keys, stop_w, os.fdopen(results_r))


def _hash_until_told(files: list[Path], stop: int, results: int) -> None:
    def told(wait: bool = False) -> bool:
        """Whether the parent said stop; SystemExit when it is gone (its end of the pipe closed)."""
        if not select.select([stop], [], [], None if wait else 0)[0]:
            return False
        if not os.read(stop, 1):
            raise SystemExit
        return True

    for i, f in enumerate(files):
        if told():
            os.write(results, b"own -\n")
            return
        if not _in_page_cache(f):  # from disk, it is the engine's to read, once and direct
            continue
        hasher, owned = FileHasher(f), False
        while hasher.hash_more(STEP):
            if not owned and told():
                os.write(results, f"own {i}\n".encode())
                owned = True
        hasher.remember()
        os.write(results, f"done {i} {hasher.hexdigest()}\n".encode())
        if owned:
            return
    if told(wait=True):
        os.write(results, b"own -\n")


def _in_page_cache(path: Path) -> bool:
    """Whether `path` is (mostly) in the page cache. Reading a file that is not would compete with the
    engine's direct reads of the same disk, and read twice where the engine overtook it: five cold
    1B-shaped inputs took 0.99-1.33x as long, hashed, with a child that read them (median 1.18)."""
    try:
        with open(path, "rb", buffering=0) as f:
            return cached_share(f.fileno(), 0, os.fstat(f.fileno()).st_size) >= MOSTLY_CACHED
    except OSError:
        return False


@dataclass
class Claim:
    """What the child hashed of an average's input files: `done` (file -> sha256), and `pending`, the file
    it is finishing, which the engine leaves to it."""

    done: dict[Path, str] = field(default_factory=dict)
    pending: Path | None = None
    _child: _Child | None = None

    def finish(self) -> dict[Path, str]:
        """`pending`'s sha256 once the child has it (hashed here should the child have died, or should
        the file have changed since the fork)."""
        child, self._child = self._child, None
        if child is None:
            return {}
        if self.pending is None:  # the child is finishing a file the engine did not read, or nothing
            os.kill(child.pid, signal.SIGTERM)
            child.end()
            return {}
        line = child.results.readline().split()
        child.end()
        if line[:2] == ["done", str(child.files.index(self.pending.resolve()))] and child.unchanged(self.pending):
            return {self.pending: line[2]}
        return {self.pending: file_sha256(self.pending)[0]}


def claim(files: Collection[Path]) -> Claim:
    """Stop the child (the one `start` forked, if any) and take what it hashed of `files`."""
    global _running
    child, _running = _running, None
    if child is None:
        return Claim()
    try:
        os.write(child.stop, b"s")
    except BrokenPipeError:  # it died: what it sent before still counts
        pass
    hashed: dict[Path, str] = {}
    owned = None
    while line := child.results.readline():
        kind, index, *digest = line.split()
        if kind == "own":
            owned = None if index == "-" else child.files[int(index)]
            break
        hashed[child.files[int(index)]] = digest[0]
    os.close(child.stop)
    by_real = {f.resolve(): f for f in files if not isinstance(f, RemotePath)}
    # a file changed since the fork is hashed again, by the engine
    done = {by_real[f]: d for f, d in hashed.items() if f in by_real and child.unchanged(f)}
    pending = by_real.get(owned) if owned is not None else None
    return Claim(done, pending, child)
