"""The storage contract, and the local filesystem's side of it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Protocol

from ..errors import InputError, with_path

_URL = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def is_url(location: str | os.PathLike) -> bool:
    """A URL that fsspec resolves (`s3://bucket/run`, `gs://...`); `file://` and plain paths are local."""
    text = str(location)
    return bool(_URL.match(text)) and not text.lower().startswith("file://")


@dataclass(frozen=True)
class FileInfo:
    """A file as its storage describes it. `identity` changes whenever its bytes may have: an object's
    ETag (a store's checksum where it has one), a local file's inode, size and modification time."""

    size: int
    identity: str


class Storage(Protocol):
    """Where a checkpoint's files are read from."""

    def info(self, path: str) -> FileInfo: ...

    def list(self, prefix: str) -> list[str]:
        """The names directly under `prefix` (files and folders), sorted."""
        ...

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the file's bytes from `offset`; a range past its end is an error."""
        ...


class LocalStorage:
    """The local filesystem."""

    def info(self, path: str) -> FileInfo:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file or folder") from None
        return FileInfo(st.st_size, f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")

    def list(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(prefix))
        except FileNotFoundError:
            raise InputError(f"{prefix}: no such folder") from None

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < len(buffer):
                got = os.preadv(fd, [buffer[done:]], offset + done)
                if got <= 0:
                    raise InputError(f"{path}: ends before byte {offset + len(buffer)}")
                done += got
        except OSError as e:
            raise with_path(e, path) from None
        finally:
            os.close(fd)
