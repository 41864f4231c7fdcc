"""Replace a file's contents all at once: write a temporary file beside it, then rename.

Readers see the old contents or the new, never half of either; two writers of the same file (threads,
processes, or hosts sharing a filesystem) never share a temporary name; a failed write leaves no
temporary file behind.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temporary path to write; renames it over `path` if the block succeeds. The suffix
    is kept, for writers that choose a format by it (matplotlib)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """`fsync` for files that mark finished work (manifests, indexes); caches can do without."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
