"""sha256 of input files for the manifest and for checking downloads, computed at most once per file.

Hashing 10 GB costs 6-9 s of one core here (1.2-1.6 GB/s), more than the averaging itself, so an
average hashes its inputs from the bytes it reads anyway (`FileHasher`, fed by the engine) and a
hash is cached by (path, size, mtime, inode): a sliding window reuses each checkpoint k times but
hashes it once. A file in the Hugging Face cache links to a blob named by the sha256 the server
announced; ckptavg hashes the blobs it downloads once (`verify_blob`), and the cache remembers
that they were checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from .atomic import write_text
from .errors import CorruptCheckpointError
from .storage.paths import RemotePath, location

_HEX64 = re.compile(r"[0-9a-f]{64}")
STAGE = 256 * 1024  # fits a core's L2 cache
TRIAL_BYTES = 64 * 1024 * 1024  # hashed each way (see _Ways) before a process keeps the faster


def cache_root() -> Path:
    """ckptavg's own cache folder: $CKPTAVG_CACHE, else ~/.cache/ckptavg."""
    return Path(os.environ.get("CKPTAVG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ckptavg"))


def cache_key(path) -> str:
    """The hash cache's name for a file as it is now: a changed file gets another."""
    if isinstance(path, RemotePath):  # an object: its URL, size and ETag
        info = path.info()
        return f"{path}|{info.size}|{info.identity}"
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _entry(key: str) -> Path:
    """One small file per hashed file, named by its key: processes on any number of hosts add entries
    without a lock (each is written whole under a temporary name, then renamed), never lose another's,
    and a lookup reads one file, whatever the cache's size."""
    name = hashlib.sha256(key.encode()).hexdigest()
    return cache_root() / "sha256" / name[:2] / name[2:]


def _lookup(key: str) -> str | None:
    try:
        entry = json.loads(_entry(key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not _HEX64.fullmatch(str(entry.get("sha256"))):
        return None
    return entry["sha256"]


def _store(key: str, digest: str) -> None:
    path = _entry(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"key": key, "sha256": digest}))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def cached_hashes() -> dict[str, str]:
    """Every entry of the hash cache: "path|size|mtime_ns|inode" -> sha256."""
    found = {}
    for entry in (cache_root() / "sha256").glob("*/*"):
        try:
            record = json.loads(entry.read_text())
            found[record["key"]] = record["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def hub_blob_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 of a Hugging Face cache file, free: an LFS file links to a blob named by it."""
    real = Path(path).resolve()
    return real.name if real.parent.name == "blobs" and _HEX64.fullmatch(real.name) else None


SAMPLE_BLOCK = 64 * 1024
SAMPLES = 8


def sample_fingerprint(path: str | os.PathLike) -> str:
    """A cheap stand-in for a file's hash: its size and a digest of a few blocks spread over it.

    Reads 9 x 64 KiB whatever the file's size. Equal files always get equal fingerprints; two
    different checkpoints almost never do, and when they do (frozen layers) a full hash decides.
    """
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        offsets = sorted({min(size, i * size // SAMPLES) for i in range(SAMPLES)} | {max(0, size - SAMPLE_BLOCK)})
        for offset in offsets:
            h.update(os.pread(f.fileno(), SAMPLE_BLOCK, offset))
    return f"{size}:{h.hexdigest()}"


def verify_blob(path: str | os.PathLike, expected: str) -> str:
    """The sha256 of a downloaded file, hashed once and remembered: huggingface_hub names a blob by
    the hash the server announced, not by the bytes that arrived, so only this proves them right.
    Returns the actual digest; a caller compares it with `expected` (the Hub's LFS listing)."""
    cached = _lookup(cache_key(Path(path)))
    if cached:
        return cached
    hasher = FileHasher(path)
    if hasher.hexdigest() == expected:
        hasher.remember()  # a wrong one is deleted by the caller, never remembered
    return hasher.hexdigest()


def known_sha256(path: str | os.PathLike) -> tuple[str, str] | None:
    """(hex digest, where it came from) when it is known without reading the file, else None. Sources:
    "cache" (hashed before), "verified" (a Hub cache blob whose bytes ckptavg hashed when it fetched
    them), "hub-blob" (a Hub cache blob's name, taken on trust: ckptavg did not download or check it)."""
    path = location(path)
    cached = _lookup(cache_key(path))
    blob = None if isinstance(path, RemotePath) else hub_blob_sha256(path)
    if blob is not None:
        return (blob, "verified") if cached == blob else (blob, "hub-blob")
    return (cached, "cache") if cached else None


def file_sha256(path: str | os.PathLike) -> tuple[str, str]:
    """(hex digest, where it came from), for the manifest: `known_sha256`'s, else "computed" (hashed
    now, in a pass of its own, and remembered)."""
    known = known_sha256(path)
    if known is not None:
        return known
    hasher = FileHasher(path)
    hasher.remember()
    return hasher.hexdigest(), "computed"


class _Ways:
    """Whether sha256 runs faster on a range straight from where it lies (the page cache's mapping, a read
    buffer) or copied, an L2-sized part at a time, into a small buffer and hashed there.

    It depends on the machine: on 512 MiB mapped from the page cache, one machine here hashed 0.85-0.97
    GB/s straight and 1.15-1.22 GB/s through the buffer, another 1.60 straight and 1.46 through it (whose
    hashed 1b average then took 5.1-6.0 s of wall straight against 6.2-6.6 s, alternated). So a process
    hashes its first TRIAL_BYTES each way, alternately, times them in the hashing threads' own CPU time
    (what another thread's work does not inflate) and from then on uses the faster way for every file."""

    def __init__(self) -> None:
        self.cpu, self.nbytes = [0.0, 0.0], [0, 0]
        self.chosen: int | None = None  # 0: straight, 1: through the buffer
        self._lock = threading.Lock()

    def next(self) -> int:
        if self.chosen is not None:
            return self.chosen
        with self._lock:
            return 0 if self.nbytes[0] <= self.nbytes[1] else 1

    def record(self, way: int, nbytes: int, cpu: float) -> None:
        if self.chosen is not None:
            return
        with self._lock:
            self.cpu[way] += cpu
            self.nbytes[way] += nbytes
            if min(self.nbytes) >= TRIAL_BYTES:
                self.chosen = min((0, 1), key=lambda w: self.cpu[w] / self.nbytes[w])


_WAYS = _Ways()


class FileHasher:
    """The sha256 of one file, computed from the byte ranges a reader reads anyway, in any order.

    Averaging reads every input once; hashing it in a pass of its own would read it twice. Ranges
    that start at the running position are hashed from the reader's buffer; a range that starts
    further on makes the hasher read the gap itself (a header, a tensor the reader skipped); one
    that starts before it was hashed already; `hexdigest` reads whatever is left. So the digest is
    the file's whatever the order of reads, and a file read front to back is read once. `remember`
    caches the digest under the file's (path, size, mtime, inode) as they were when hashing began.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = location(path)
        self._key = cache_key(self.path)
        self._sha = hashlib.sha256()
        self._pos = 0
        self._digest: str | None = None
        self._stage: np.ndarray | None = None

    def _staging(self) -> np.ndarray:
        if self._stage is None:
            self._stage = np.empty(STAGE, dtype=np.uint8)
        return self._stage

    def _update(self, data: memoryview) -> None:
        """Ranges larger than the buffer are hashed the way this machine hashes faster (`_Ways`)."""
        if len(data) <= STAGE:
            self._sha.update(data)
            return
        way, cpu = _WAYS.next(), time.thread_time()
        if way == 0:
            self._sha.update(data)
        else:  # copied in by numpy, which lets go of the GIL
            stage, src = self._staging(), np.frombuffer(data, dtype=np.uint8)
            for a in range(0, src.size, STAGE):
                part = stage[: min(STAGE, src.size - a)]
                np.copyto(part, src[a : a + STAGE])
                self._sha.update(part)
        _WAYS.record(way, len(data), time.thread_time() - cpu)

    def _read_to(self, end: int | None) -> None:
        """Hash the file's own bytes from the running position up to `end` (None: to the end)."""
        view = memoryview(self._staging())
        if isinstance(self.path, RemotePath):
            stop = self.path.info().size if end is None else end
            while self._pos < stop:
                part = view[: min(len(view), stop - self._pos)]
                self.path.storage.read_into(self.path.path, self._pos, part)
                self._sha.update(part)
                self._pos += len(part)
            return
        with open(self.path, "rb", buffering=0) as f:
            while end is None or self._pos < end:
                want = len(view) if end is None else min(len(view), end - self._pos)
                n = os.preadv(f.fileno(), [view[:want]], self._pos)
                if n <= 0:
                    if end is None:
                        return
                    raise CorruptCheckpointError(f"{self.path}: file shrank while being hashed")
                self._sha.update(view[:n])
                self._pos += n

    def update(self, offset: int, data: memoryview) -> None:
        """The bytes at `offset` in the file, as just read from it."""
        end = offset + len(data)
        if end <= self._pos:
            return
        if offset > self._pos:
            self._read_to(offset)
        self._update(data[self._pos - offset :])
        self._pos = end

    def hash_more(self, nbytes: int) -> bool:
        """Read and hash up to `nbytes` more of a local file, for a hasher that reads it alone
        (`hash_ahead`) and looks up between steps; False once the whole file is hashed."""
        end = min(os.path.getsize(self.path), self._pos + nbytes)
        if end <= self._pos:
            return False
        self._read_to(end)
        return True

    def hexdigest(self) -> str:
        if self._digest is None:
            self._read_to(None)
            self._digest = self._sha.hexdigest()
            self._stage = None
        return self._digest

    def remember(self) -> None:
        _store(self._key, self.hexdigest())
