"""The output folder of one average shared by ranks: rank 0 creates it and commits it, the others join it and
write their files into it, and nobody but rank 0 ever deletes anything.

The folder is named by the plan (`layout.ranked_temporary_name`), not by a process, and every output file a
rank finishes (fsynced) is marked done, so the same command run again after a failure (a rank killed, a
node lost) keeps the finished files and writes the rest: a failed launch leaves its hidden folder for that
rerun, and any other run on the same output removes it. While a launch lives, its rank 0 holds the output's
lock (`writer.try_lock`, flock on the shared filesystem), so a second launch on the same output refuses, and
no run, on this host or another, takes the live launch's folder for a dead one's.

On an object store (`RankedRemoteOutput`) the files go to their final names, as one process's do
(`upload.py`), and rank 0's marker, put again while the launch lives, names the plan: a second launch finds
it alive and refuses; a rerun of the same plan finds it stale and keeps the objects of the right size (an
upload becomes an object only once complete); any other run clears them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import OutputExistsError
from ..layout import lock_name, ranked_temporary_name
from ..manifest import Manifest
from ..storage.paths import RemotePath
from .plan import Shard
from .upload import RemoteOutputDir
from .writer import check_free_space, commit_folder, remove_stale_temporaries, try_lock, unlock

DONE = ".done"  # in the temporary folder: one empty marker per finished output file, removed at commit


class RankedOutput:
    """An output folder on a shared filesystem: rank 0 `create`s and `commit`s it, every rank writes into `path`."""

    def __init__(self, final: str | os.PathLike, digest: str, *, force: bool = False) -> None:
        self.final = Path(final).absolute()
        self.force = force
        self.path = ranked_temporary_name(self.final, digest)
        self._lock: int | None = None

    def check(self) -> None:
        if self.final.exists() and not self.force:
            raise OutputExistsError(f"{self.final} exists (pass --force to replace it)")

    def create(self, nbytes: int) -> None:
        """Rank 0: take the output's lock, clear what dead runs left (but this plan's finished files), make
        the folder."""
        self.check()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._lock = try_lock(self.final)
        if self._lock is None:
            raise OutputExistsError(f"{self.final}: another launch is writing it (it holds {lock_name(self.final)}); "
                                    f"wait for it to finish, or write elsewhere")
        remove_stale_temporaries(self.final, locked=True, keep=self.path)
        check_free_space(self.final.parent, nbytes - self._kept_bytes())
        (self.path / DONE).mkdir(parents=True, exist_ok=True)

    def _kept_bytes(self) -> int:
        done = self.path / DONE
        files = [self.path / m.relative_to(done).with_suffix("") for m in done.rglob("*.done")]
        return sum(f.stat().st_size for f in files if f.is_file())

    def _marker(self, shard: Shard) -> Path:
        return self.path / DONE / f"{shard.filename}.done"

    def done(self, shard: Shard) -> bool:
        """Whether an earlier attempt of this plan finished `shard`'s file (marked, and whole)."""
        file = self.path / shard.filename
        return self._marker(shard).is_file() and file.is_file() and file.stat().st_size == shard.nbytes

    def mark(self, shard: Shard) -> None:
        """`shard`'s file is written and fsynced: a rerun keeps it."""
        marker = self._marker(shard)
        marker.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self, manifest: Manifest, fsync_files: Iterable[Path] = ()) -> Path:
        """Rank 0, once every rank has written its files: the folder appears whole, the lock goes."""
        shutil.rmtree(self.path / DONE)
        commit_folder(self.path, self.final, manifest, fsync_files, force=self.force)
        self.release()
        return self.final

    def release(self) -> None:
        """Let go of the output (rank 0, committed or failed: the folder is kept for a rerun)."""
        if self._lock is not None:
            unlock(self.final, self._lock)
            self._lock = None


class RankedRemoteOutput(RemoteOutputDir):
    """`RankedOutput`'s contract on a store (rank 0 creates and commits, the others write their objects)."""

    def __init__(self, final: RemotePath, digest: str, *, force: bool = False) -> None:
        super().__init__(final, force)
        self.plan = digest

    def create(self, nbytes: int) -> None:
        self.check()  # (a live launch's marker: refused)
        left = self._writer()
        if self.force or left is None or left.get("plan") != self.plan:
            self._clear()  # (the same plan's failed attempt: its finished objects are kept)
        self._start()

    def done(self, shard: Shard) -> bool:
        file = self.final / shard.filename
        return file.is_file() and file.stat().st_size == shard.nbytes

    def mark(self, shard: Shard) -> None:
        """(An object is whole once its upload completes: nothing to mark.)"""

    def release(self) -> None:
        """Stop the marker's heartbeat; after a failure the objects stay, for the same command to take up."""
        self._stop()
