"""Outputs on an object store (`--out s3://bucket/avg`): each file streamed up as a multipart upload,
the manifest put last.

A store has no rename, so an output is not built under a temporary name: its files go straight to
their final names, and what marks it finished is the manifest alone, put (one PUT: all of it or none)
only once every file's upload is complete. Until then a marker object names the output as one being
written, and by whom, put again every `HEARTBEAT` seconds: a later run knows a live writer's output (its
own host's process is alive, another host's marker is fresher than `STALE`: refused, so that no run
deletes files another is about to commit) from a killed run's leftovers (replaced without `--force`)
and from objects someone else keeps there (refused without `--force`). A file's upload becomes an
object only when it completes; one that fails is aborted, and the objects already put are deleted
(unless another run has taken the output over), so an error leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from ..errors import CkptavgError, IOFailure, OutputExistsError
from ..manifest import MANIFEST, Manifest, manifest_json
from ..storage.paths import RemotePath, location
from .plan import Shard
from .writer import STAGE_BYTES, OutputDir, ShardFile, pid_alive

WRITING = ".ckptavg-writing"  # present while an output is being put, gone once its manifest is
HEARTBEAT = 30.0  # seconds between puts of a writer's marker
STALE = 600.0  # another host's marker older than this: its writer is gone


class RemoteShardFile(ShardFile):
    """An output file put in parts of `STAGE_BYTES` as its bytes come; an object once `finish`ed."""

    path: RemotePath

    def _open(self, direct: bool) -> None:
        self.direct = False
        self._file = self.path.storage.open_write(self.path.path, STAGE_BYTES)

    def _flush(self, nbytes: int) -> None:
        try:
            self._file.write(memoryview(self._stage)[:nbytes])
        except Exception as e:  # noqa: BLE001  (the store client's own kinds)
            raise self.path.storage.error(self.path.path, e) from None
        self._fill = 0

    def _complete(self) -> None:
        if self._fill:
            self._flush(self._fill)
        try:
            self._file.close()  # completes the upload: the object appears whole
        except Exception as e:  # noqa: BLE001
            raise self.path.storage.error(self.path.path, e) from None
        self._file = None

    def _close(self) -> None:
        if self._file is not None:  # an upload not completed: its parts are dropped and no object appears
            try:
                self._file.discard()
            except Exception:  # noqa: BLE001, S110  (a store gone away keeps the parts until its lifecycle rule)
                pass
            self._file.closed = True
            self._file = None


def open_shard(path: Path | RemotePath, shard: Shard) -> ShardFile:
    return RemoteShardFile(path, shard) if isinstance(path, RemotePath) else ShardFile(path, shard)


class RemoteOutputDir:
    """`OutputDir`'s contract on a store: `with` it, write under `path`, `commit` the manifest."""

    def __init__(self, final: RemotePath, force: bool = False) -> None:
        self.final = self.path = final
        self.force = force
        self._committed = False
        self._token = uuid.uuid4().hex  # this run's, in its marker
        self.plan: str | None = None  # what an average on ranks computes (its digest), in its marker
        self._stop_beating = threading.Event()
        self._beating: threading.Thread | None = None

    def _objects(self) -> list[str]:
        return list(self.final.storage.find(self.final.path))

    def check(self) -> None:
        if self.force:
            return
        if (self.final / MANIFEST).exists():
            raise OutputExistsError(f"{self.final} exists (pass --force to replace it)")
        objects = self._objects()
        if not objects:
            return
        if (self.final / WRITING).path not in objects:
            raise OutputExistsError(f"{self.final} holds objects that no ckptavg run is writing "
                                    f"(pass --force to replace them)")
        writer = self._writer()  # (the listing shows a marker: whose is it?)
        if writer is not None and writer.get("token") != self._token and _alive(writer):
            raise OutputExistsError(f"{self.final} is being written by process {writer.get('pid')} on "
                                    f"{writer.get('host')}: run again once it is done (or pass --force)")

    def _writer(self) -> dict | None:
        """What the marker says of the run writing this output (None: no marker, or one unreadable)."""
        try:
            writer = json.loads((self.final / WRITING).read_text())
        except (FileNotFoundError, ValueError, CkptavgError):
            return None
        return writer if isinstance(writer, dict) else None

    def _put_marker(self, started: str) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": self._token, "started": started,
                 "beat": time.time(), **({"plan": self.plan} if self.plan else {})}
        (self.final / WRITING).write_text(json.dumps(owner))

    def _beat(self, started: str) -> None:
        while not self._stop_beating.wait(HEARTBEAT):
            try:
                self._put_marker(started)
            except CkptavgError:
                pass  # a store unreachable for a while: the next beat tries again

    def __enter__(self) -> RemoteOutputDir:
        self.check()
        self._clear()
        self._start()
        return self

    def _start(self) -> None:
        """Put the marker, and again every `HEARTBEAT` seconds until the commit."""
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._put_marker(started)
        self._beating = threading.Thread(target=self._beat, args=(started,), daemon=True, name="ckptavg-marker")
        self._beating.start()

    def _stop(self) -> None:
        self._stop_beating.set()
        if self._beating is not None:
            self._beating.join()
            self._beating = None

    def _clear(self) -> None:
        """Delete what is there, the manifest first (an output replaced stops being one before any of
        its files changes) and the marker last (until then a later run knows the rest for leftovers)."""
        objects = self._objects()
        marker = (self.final / WRITING).path
        manifest = (self.final / MANIFEST).path
        storage = self.final.storage
        if manifest in objects:
            storage.remove([manifest])
        storage.remove([o for o in objects if o not in (manifest, marker)])
        if marker in objects:
            storage.remove([marker])

    def check_space(self, nbytes: int) -> None:
        """A store's space is not known ahead: its quota, if any, is met as an error when reached."""

    def commit(self, manifest: Manifest, fsync_files: Iterable[Path] = ()) -> RemotePath:
        """Put the manifest (every file's upload has completed by now), then drop the marker."""
        if (self.final / MANIFEST).exists() and not self.force:
            raise OutputExistsError(f"{self.final} appeared while writing (pass --force to replace it)")
        self._stop()
        (self.final / MANIFEST).write_text(manifest_json(manifest))
        self._committed = True
        self.final.storage.remove([(self.final / WRITING).path])
        return self.final

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> None:
        self._stop()
        if not self._committed:
            try:
                writer = self._writer()
                if writer is None or writer.get("token") == self._token:  # (not an output another run took over)
                    self._clear()
            except CkptavgError:
                pass  # the store is unreachable: the marker says what is left there, and the next run clears it
        if isinstance(error, OSError):
            raise IOFailure(f"{self.final}: {error}; nothing was left there") from None


def _alive(writer: dict) -> bool:
    """Whether the run a marker names may still be writing: on this host, whether its process is; on
    another (whose processes cannot be asked after from here), whether it put its marker within STALE."""
    if writer.get("host") == socket.gethostname() and isinstance(writer.get("pid"), int):
        return pid_alive(writer["pid"])
    beat = writer.get("beat")
    return isinstance(beat, (int, float)) and time.time() - beat < STALE


def open_output(out: str | os.PathLike | RemotePath, force: bool = False) -> OutputDir | RemoteOutputDir:
    """Where an average is written: a local folder, or a prefix on a store for a URL."""
    where = location(out)
    return RemoteOutputDir(where, force) if isinstance(where, RemotePath) else OutputDir(where, force)
