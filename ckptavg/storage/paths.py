"""A file or folder on an object store, spoken to as the formats speak to a local `Path` (`name`,
`parent`, `/`, `is_file`, `iterdir`, `glob`, `stat`, `open`, `read_text`): so that the checkpoint
formats read headers, metadata and zip directories from a store as they do from disk, while tensor
bytes go through `Storage.read_into` in ranged reads. `location(x)` turns a path or URL into one or
the other.
"""

from __future__ import annotations

import fnmatch
import io
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .base import FileInfo, is_url

# the read-ahead of a remote file opened for its small parts (a header, a zip directory, a pickle)
SMALL_READS = 1 << 20


@dataclass(frozen=True)
class _Stat:
    st_size: int
    identity: str


class RemotePath:
    def __init__(self, storage, path: str) -> None:
        self.storage, self.path = storage, path.rstrip("/")

    # -- names
    def __str__(self) -> str:
        return self.storage.url(self.path)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)

    def __lt__(self, other: RemotePath) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.storage, posixpath.normpath(posixpath.join(self.path, str(name))))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.storage, posixpath.dirname(self.path))

    def absolute(self) -> RemotePath:
        return self

    def resolve(self) -> RemotePath:
        return self

    # -- what is there
    def info(self) -> FileInfo:
        return self.storage.info(self.path)

    def stat(self) -> _Stat:
        info = self.info()
        return _Stat(info.size, info.identity)

    def exists(self) -> bool:
        """Whether there is an object or prefix here; a store that refuses to say is an error, not a no."""
        try:
            self.storage.fs.info(self.path)
            return True
        except FileNotFoundError:
            return False
        except PermissionError:
            raise InputError(f"{self}: access denied (PermissionError)") from None

    def is_file(self) -> bool:
        return self.storage.fs.isfile(self.path)

    def is_dir(self) -> bool:
        return self.storage.fs.isdir(self.path)

    def iterdir(self):
        return iter([self / n for n in self.storage.list(self.path)])

    def glob(self, pattern: str):
        return iter([p for p in self.iterdir() if fnmatch.fnmatch(p.name, pattern)])

    # -- its bytes
    def open(self, mode: str = "rb") -> io.BufferedReader:
        """A seekable binary file, read ahead `SMALL_READS` at a time, every read a ranged read of the
        storage's (so asked again on a passing fault, like the tensors' bytes)."""
        if mode != "rb":
            raise ValueError("remote files are opened for reading only")
        try:
            size = self.storage.fs.info(self.path)["size"]
        except FileNotFoundError:  # (as a local file's: the callers that look for optional files catch it)
            raise FileNotFoundError(2, "no such object", str(self)) from None
        except Exception:  # noqa: BLE001  (a passing fault, or one to be named: as the storage says it)
            size = self.info().size
        return io.BufferedReader(_RangedFile(self, int(size)), buffer_size=SMALL_READS)

    def write_bytes(self, data: bytes) -> None:
        self.storage.write(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a store has no folders, only names with slashes in them."""

    def read_bytes(self) -> bytes:
        with self.open() as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()


class _RangedFile(io.RawIOBase):
    def __init__(self, where: RemotePath, size: int) -> None:
        self.where, self.size, self.pos = where, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        if n:
            self.where.storage.read_into(self.where.path, self.pos, memoryview(buffer).cast("B")[:n])
            self.pos += n
        return n


def location(value: str | os.PathLike | RemotePath, storage_options: dict | None = None) -> Path | RemotePath:
    """A local `Path`, or a `RemotePath` for a URL."""
    if isinstance(value, (Path, RemotePath)):
        return value
    if is_url(value):
        from .remote import FsspecStorage

        storage, path = FsspecStorage.for_url(str(value), storage_options)
        return RemotePath(storage, path)
    return Path(value)
