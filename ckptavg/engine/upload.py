"""Outputs on an object store (`--out s3://bucket/avg`): each file streamed up as a multipart upload,
the manifest put last.

A store has no rename, so an output is not built under a temporary name: its files go straight to
their final names, and what marks it finished is the manifest alone, put (one PUT: all of it or none)
only once every file's upload is complete. Until then a marker object names the output as one being
written, so that a later run knows leftovers of a killed run (replaced without `--force`) from
objects someone else keeps there (refused without `--force`). A file's upload becomes an object only
when it completes; one that fails is aborted, and the objects already put are deleted, so an error
leaves nothing behind. Two runs writing the same output put the same bytes (the average is
deterministic), so the output is whole whichever manifest lands last.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from ..errors import CkptavgError, IOFailure, OutputExistsError
from ..manifest import MANIFEST, Manifest, manifest_json
from ..storage.paths import RemotePath, location
from .plan import Shard
from .writer import STAGE_BYTES, OutputDir, ShardFile

WRITING = ".ckptavg-writing"  # present while an output is being put, gone once its manifest is


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

    def _objects(self) -> list[str]:
        return list(self.final.storage.find(self.final.path))

    def check(self) -> None:
        if self.force:
            return
        if (self.final / MANIFEST).exists():
            raise OutputExistsError(f"{self.final} exists (pass --force to replace it)")
        objects = self._objects()
        if objects and (self.final / WRITING).path not in objects:
            raise OutputExistsError(f"{self.final} holds objects that no ckptavg run is writing "
                                    f"(pass --force to replace them)")

    def __enter__(self) -> RemoteOutputDir:
        self.check()
        self._clear()
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (self.final / WRITING).write_text(json.dumps(owner))
        return self

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
        (self.final / MANIFEST).write_text(manifest_json(manifest))
        self._committed = True
        self.final.storage.remove([(self.final / WRITING).path])
        return self.final

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> None:
        if not self._committed:
            try:
                self._clear()
            except CkptavgError:
                pass  # the store is unreachable: the marker says what is left there, and the next run clears it
        if isinstance(error, OSError):
            raise IOFailure(f"{self.final}: {error}; nothing was left there") from None


def open_output(out: str | os.PathLike | RemotePath, force: bool = False) -> OutputDir | RemoteOutputDir:
    """Where an average is written: a local folder, or a prefix on a store for a URL."""
    where = location(out)
    return RemoteOutputDir(where, force) if isinstance(where, RemotePath) else OutputDir(where, force)
