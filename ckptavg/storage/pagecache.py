"""What of a local file is in the page cache, asked of the kernel page by page (mincore(2)), reading
nothing: the engine's reader maps what is there and reads the rest direct, and the child that hashes
inputs ahead of an average (`hash_ahead`) leaves files that are not there to the engine. No torch here.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

# mincore(2), through ctypes: the kernel's page-by-page answer to "is this range in the page cache?"
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_RESIDENT = bytes(i & 1 for i in range(256))  # mincore's bit 0: the page is resident (the others are reserved)


# A range with at least this share of its pages in the page cache is read as cached (mapped, its few
# missing pages faulted in from disk). A page cache that is "warm" still loses pages here and there (on
# these machines a few hundred to a few thousand pages of each 2 GB file, in a dozen stretches, within
# seconds of the file being read): taking such a range for one on disk sent the rest of its file past
# the cache to the disk, and a warm average took a cold one's time in some repetitions and not others.
MOSTLY_CACHED = 0.75


def cached_share(fd: int, pos: int, nbytes: int) -> float:
    """The share of a range's pages in the page cache, as mincore(2) reports for a mapping of it, which
    reads nothing. (A one-byte read that may not wait, RWF_NOWAIT, tried before, starts read-ahead
    where it misses: the next average of a sliding window then found the ends of its ranges cached and
    mapped whole ranges that were on disk.) Anything unexpected counts as none cached: the range is
    then read, which is always right."""
    if _libc is None or nbytes <= 0:
        return 0.0
    base = pos - pos % mmap.ALLOCATIONGRANULARITY
    length = pos + nbytes - base
    try:
        mapping = mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=base)
    except (OSError, ValueError):
        return 0.0
    try:
        first, count = (pos - base) // mmap.PAGESIZE, -(-length // mmap.PAGESIZE)
        pages = (ctypes.c_ubyte * count)()
        start = ctypes.c_char.from_buffer(mapping)
        try:
            status = _libc.mincore(ctypes.addressof(start), length, pages)
        finally:
            del start  # the mapping cannot close while a ctypes object points into it
        if status != 0:
            return 0.0
        ours = bytes(pages)[first:]  # (the pages before `pos` that the mapping's alignment took in are not)
        return ours.translate(_RESIDENT).count(1) / len(ours)
    finally:
        mapping.close()
