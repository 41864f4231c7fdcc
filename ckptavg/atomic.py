"""Replace a small file's contents all at once: write a temporary file beside it, then rename.

Readers see the old contents or the new, never half of either, and two processes writing the
same file never share a temporary name.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text(path: Path, text: str, *, fsync: bool = False) -> None:
    """`fsync` for files that mark finished work (manifests, indexes); caches can do without."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
