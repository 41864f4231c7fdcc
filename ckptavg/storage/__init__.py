"""How bytes arrive: the storage a checkpoint's files live on, apart from which bytes a format wants
(`ckptavg.checkpoints`). A storage says how big a file is and what version of it this is, lists a
prefix, and reads a byte range into a buffer the caller owns.

    base.py     the contract: `FileInfo`, `Storage`; `is_url`
    remote.py   any fsspec URL (`s3://`, `gs://`, ...): ranged reads retried and resumed at the chunk
                where they stopped, one-line errors
    paths.py    `RemotePath`, a store's file as the formats speak to a `Path`; `location(x)`, a path or URL
                as a `Path` or a `RemotePath`
    pagecache.py  how much of a local file's range is in the page cache (mincore), reading none of it

Local files are read by the engine's `TensorReader` itself (direct I/O, mapping). No torch here.
"""

from __future__ import annotations

from .base import FileInfo, Storage, is_url

__all__ = ["FileInfo", "Storage", "is_url"]
