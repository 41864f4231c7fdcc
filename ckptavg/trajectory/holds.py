"""Which revisions of one Hub repo ckptavg downloaded into one cache, and which revisions a live run holds.

Several runs (processes, or jobs on hosts that share the cache's filesystem) may use one Hugging Face
cache at once, with overlapping revisions. A run deletes a revision when it is done with it, but only one
that ckptavg downloaded (the ledger: an empty marker file per revision, added and removed whole, so two
runs never lose each other's entries) and only if no other live run holds it.

A hold is a shared `flock` on the revision's lock file, taken before the revision is looked up in the
cache or downloaded and kept until the run lets it go; deleting takes the lock exclusive without waiting,
so a revision another run holds is left to that run, which deletes it when it lets go in turn. The kernel
drops a killed run's locks, so no run ever has to guess whether another is alive. Everything lives in the
cache itself (`.locks/ckptavg/`, beside huggingface_hub's own locks, which its cache scan skips), so every
host and user that shares the cache sees the same holds. A cache where these files cannot be written (a
read-only, pre-filled one) is read without holds: ckptavg downloads nothing into it, so deletes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


class RevisionLedger:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._held: dict[str, int] = {}  # commit -> the open lock file holding it shared

    @property
    def _markers(self) -> Path:
        return self.folder / "downloaded"

    def downloaded(self) -> set[str]:
        """Commits that ckptavg downloaded into this cache and has not deleted yet."""
        try:
            return {e.name for e in os.scandir(self._markers) if not e.name.startswith(".")}
        except FileNotFoundError:
            return set()

    def mark_downloaded(self, commit: str) -> None:
        try:
            self._markers.mkdir(parents=True, exist_ok=True)
            (self._markers / commit).touch()
        except OSError as e:
            if e.errno not in _READ_ONLY:
                raise  # (unmarked, a download is only never deleted)

    def held(self) -> set[str]:
        return set(self._held)

    def _open(self, name: str) -> int | None:
        """The lock file `name`, open; None where the cache cannot take one (read-only)."""
        path = self.folder / "held" / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # (an exclusive flock on NFS needs a file open for writing)
                return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:  # another user's lock file in a shared cache
                return os.open(path, os.O_RDONLY)
        except OSError as e:
            if e.errno in _READ_ONLY:
                return None
            raise

    def hold(self, commit: str) -> None:
        """Keep every other run from deleting `commit` until `let_go`; waits while one is deleting it."""
        if commit not in self._held:
            fd = self._open(f"{commit}.lock")
            if fd is None:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
            self._held[commit] = fd

    def let_go(self, commit: str, delete: Callable[[], None]) -> bool:
        """Release `commit` (held or not) and, if ckptavg downloaded it and no other run holds it, call
        `delete` and forget it. Returns whether it was deleted."""
        fd = self._held.pop(commit, None)
        if fd is None:
            fd = self._open(f"{commit}.lock")
        if fd is None:
            return False  # a cache that takes no lock takes no deletion either
        try:
            if commit not in self.downloaded():
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # another run holds it: it deletes it when it lets go
            with self._deleting():
                if commit not in self.downloaded():  # another run deleted it first
                    return False
                delete()
                (self._markers / commit).unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    @contextmanager
    def _deleting(self):
        """One deletion at a time per repo: two at once could each see a blob the revisions share as
        still used by the other, and leave it behind."""
        fd = self._open("delete.lock")
        if fd is None:  # (the revision's own lock was taken, so this one can be)
            raise OSError(errno.EACCES, "cannot open the deletion lock", str(self.folder / "held" / "delete.lock"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def release(self) -> None:
        """Let go of every revision held, deleting none (for a run that keeps its downloads, or ends)."""
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()
