"""How bytes arrive: the storage a checkpoint's files live on, apart from which bytes a format wants
(`ckptavg.checkpoints`). A storage says how big a file is and what version of it this is, lists a
prefix, and reads a byte range into a buffer the caller owns; the local filesystem and any fsspec URL
(`s3://`, `gs://`, ...) are its two kinds.

    base.py     the contract: `FileInfo`, `Storage`
    remote.py   fsspec: ranged reads retried and resumed at the byte they stopped, one-line errors
    open_storage(location)   the storage a path or URL lives on, and the path within it

The local filesystem's reader (direct I/O, mapping, mincore) is the engine's `TensorReader` today; the
engine is to read remote files through `Storage.read_into` next (issue 26). No torch here.
"""

from __future__ import annotations

from .base import FileInfo, Storage, is_url

__all__ = ["FileInfo", "Storage", "is_url", "open_storage"]


def open_storage(location: str, storage_options: dict | None = None) -> tuple[Storage, str]:
    """The storage `location` lives on, and its path there: a URL's fsspec filesystem (its package
    imported only now), or the local filesystem."""
    if is_url(location):
        from .remote import FsspecStorage

        return FsspecStorage.for_url(location, storage_options)
    from .base import LocalStorage

    return LocalStorage(), location
