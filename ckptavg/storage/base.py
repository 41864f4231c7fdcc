"""The storage contract: what a storage says of a file, and how its bytes are asked for."""

from __future__ import annotations

import os
import re
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Protocol

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

    def start_read(self, path: str, offset: int, buffer: memoryview) -> list[Future]:
        """`read_into` begun, not waited for: the caller waits for the futures (`finish_reads`)."""
        ...


def finish_reads(futures: list[Future], raise_first: bool = True) -> None:
    """Wait for every read begun (none still writes into its buffer after this returns), then raise the
    first error (unless `raise_first` is False: a pipeline stopping for another error)."""
    wait(futures)
    if raise_first:
        for f in futures:
            f.result()
