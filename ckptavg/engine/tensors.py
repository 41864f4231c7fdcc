"""The reader that fetches the bytes of tensors, wherever the checkpoint index (`ckptavg.checkpoints`)
says they lie: byte ranges of files, read with large `pread` calls, direct from disk or mapped from the
page cache, never through a format's own loader.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Collection
from concurrent.futures import Future
from pathlib import Path

import torch

from ..checkpoints.index import TensorRef
from ..checkpoints.torchsave import load_state_dict
from ..errors import CorruptCheckpointError, with_path
from ..storage.base import finish_reads
from ..storage.pagecache import MOSTLY_CACHED, cached_share
from ..storage.paths import RemotePath

# madvise(MADV_POPULATE_READ): Linux 5.14+, not named by Python's mmap module before 3.13
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
# Direct I/O moves whole blocks from aligned memory: 4096 covers 512-byte and 4K-sector devices.
DIRECT_ALIGN = 4096
# Spare bytes a buffer needs beyond a range's own for `TensorReader` to read it direct: the distance to
# the buffer's first aligned byte, and the range's first and last blocks read whole.
DIRECT_SLACK = 3 * DIRECT_ALIGN


def whole_blocks(nbytes: int) -> int:
    """`nbytes` rounded up to whole direct-I/O blocks."""
    return -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN


def _typed(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes as elements of `dtype`, where they lie. A range need not start at a multiple of the element
    size (a DCP record, or a `.bin` member, sits anywhere in its file, and direct I/O puts the range's
    block at an aligned address), which `Tensor.view` refuses; a tensor made on the same bytes is read
    by torch's kernels (and copied to a GPU) all the same, where moving the bytes would cost a copy."""
    if not data.numel():
        return torch.empty(0, dtype=dtype)
    if data.data_ptr() % dtype.itemsize == 0:
        return data.view(dtype)
    return torch.frombuffer(data.numpy(), dtype=dtype)


def _shrank(ref: TensorRef) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{ref.file}: file shrank while reading {ref.name!r}")


class Reads:
    """Ranges being read (`TensorReader.start_many`): `done` once every one has arrived, `result()` waits."""

    def __init__(self, views: list[torch.Tensor | None],
                 pending: list[tuple[int, torch.Tensor, torch.dtype, list[Future]]]) -> None:
        self.views, self.pending = views, pending  # pending: (position, its bytes, their dtype, their GETs)

    @property
    def futures(self) -> list[Future]:
        return [f for *_, futures in self.pending for f in futures]

    @property
    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def result(self) -> list[torch.Tensor]:
        finish_reads(self.futures)
        for i, data, dtype, _ in self.pending:
            self.views[i] = _typed(data, dtype)
        self.pending = []
        return self.views


class TensorReader:
    """Fetches byte ranges of tensors, into caller-owned buffers or as views of the file.

    With `map_files`, a safetensors file that is in the page cache is mapped (private, so torch may
    treat it as writable; it is never written, so no page is copied) and faulted in at once with
    MADV_POPULATE_READ, in the reader's thread: no copy out of the page cache. Without it (pinned
    buffers bound for a GPU) a cached range is copied out of the cache with `preadv`. Whether a range
    is cached is asked of the kernel, page by page (mincore), not guessed from timings, so a reader
    thread that lost its core for a moment never mistakes the page cache for a disk; a range with a few
    pages missing (`MOSTLY_CACHED`) counts as cached.

    A file with a range that was mostly not cached is read from there to its end straight from the disk
    into the caller's buffer (O_DIRECT, whole aligned blocks; `DIRECT_SLACK` spare bytes in the buffer
    make room for the alignment), even where read-ahead has cached what follows: the page cache costs
    this path CPU it does not repay, and a 12B model's checkpoints would only churn it. A filesystem
    that refuses direct I/O, or a buffer without the spare bytes, gets plain `preadv`, and so do
    `keep_cached` files: a later average reads them again (a sliding window's shared checkpoints), and
    finding them in the page cache beats reading them from disk again. (The measurements behind each
    choice: docs/how-it-works.md, "Why the engine reads and writes as it does".)
    Either way one call per piece, sequential within each file. The rare tensor without a byte range
    of its own (`TensorRef.offset` None) is copied out of `torch.load`'s mapping of its file. A file on an
    object store (`storage.paths.RemotePath`) is read with ranged GETs straight into the caller's buffer.
    """

    def __init__(self, map_files: bool = False, keep_cached: Collection[Path] = ()) -> None:
        self.map_files = map_files
        self.keep_cached = frozenset(keep_cached)
        self._from_disk: set[Path] = set()  # files with a range that was not in the page cache
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int | None] = {}  # None: the filesystem refuses direct I/O
        self._state_dicts: dict[Path, dict[str, torch.Tensor]] = {}

    def read_many(self, requests: list[tuple[TensorRef, int, int, torch.Tensor]]) -> list[torch.Tensor]:
        """`read` of each (ref, start, count, out), the ranges on object stores all in flight together
        (every input's piece at once), the local ones read meanwhile."""
        return self.start_many(requests).result()

    def start_many(self, requests: list[tuple[TensorRef, int, int, torch.Tensor]]) -> Reads:
        """`read_many` begun: the local ranges are read now, the ones on stores are left in flight for the
        caller to start more (the next pieces) before it waits for these."""
        views: list[torch.Tensor | None] = [None] * len(requests)
        remote = []
        try:
            for i, (ref, start, count, out) in enumerate(requests):
                if isinstance(ref.file, RemotePath) and ref.offset is not None:
                    data = out[: count * ref.dtype.itemsize]
                    pos = ref.offset + start * ref.dtype.itemsize
                    futures = ref.file.storage.start_read(ref.file.path, pos, memoryview(data.numpy()))
                    remote.append((i, data, ref.dtype, futures))
                else:
                    views[i] = self.read(ref, start, count, out)
        except BaseException:  # (the error that stopped it, not one of the GETs', is the one raised)
            finish_reads(Reads(views, remote).futures, raise_first=False)
            raise
        return Reads(views, remote)

    def read(self, ref: TensorRef, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [start, start+count) of `ref` as a typed 1-D tensor: a view of `out` (a uint8
        buffer) filled with them, or, with `map_files`, of the file itself (valid while referenced)."""
        try:
            return self._read(ref, start, count, out)
        except OSError as e:  # EIO, a file that vanished or lost its permissions mid-run: name it
            raise with_path(e, ref.file) from None

    def _read(self, ref: TensorRef, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        nbytes = count * ref.dtype.itemsize
        if isinstance(ref.file, RemotePath) and ref.offset is not None:  # an object store: ranged reads
            return self.read_many([(ref, start, count, out)])[0]
        if ref.offset is None:
            sd = self._state_dicts.get(ref.file)
            if sd is None:
                sd = self._state_dicts[ref.file] = load_state_dict(ref.file)
            typed = out[:nbytes].view(ref.dtype)
            typed.copy_(sd[ref.name].reshape(-1)[start : start + count])
            return typed
        fd = self._fds.get(ref.file)
        if fd is None:
            fd = self._fds[ref.file] = os.open(ref.file, os.O_RDONLY)
        pos = ref.offset + start * ref.dtype.itemsize
        if nbytes and ref.file not in self._from_disk and cached_share(fd, pos, nbytes) < MOSTLY_CACHED:
            self._from_disk.add(ref.file)
        from_disk = ref.file in self._from_disk
        if from_disk and ref.file not in self.keep_cached:
            data = self._read_direct(ref, pos, nbytes, out)
        elif self.map_files and nbytes and not from_disk:
            data = self._map(fd, pos, nbytes, ref)
        else:  # cached, bound for a GPU; or from disk and kept in the cache for a later average
            data = self._pread(fd, pos, out[:nbytes], ref)
        return _typed(data, ref.dtype)

    @staticmethod
    def _pread(fd: int, pos: int, dst: torch.Tensor, ref: TensorRef) -> torch.Tensor:
        """`dst` filled with the file's bytes from `pos`, through the page cache."""
        view, done = memoryview(dst.numpy()), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise _shrank(ref)
            done += got
        return dst

    def _direct_fd(self, file: Path) -> int | None:
        if file not in self._direct_fds:
            try:
                self._direct_fds[file] = os.open(file, os.O_RDONLY | os.O_DIRECT)
            except (OSError, AttributeError) as e:  # EINVAL: tmpfs before Linux 6.6, some network filesystems
                if isinstance(e, OSError) and e.errno != errno.EINVAL:
                    raise
                self._direct_fds[file] = None
        return self._direct_fds[file]

    def _read_direct(self, ref: TensorRef, pos: int, nbytes: int, out: torch.Tensor) -> torch.Tensor:
        """The range read from disk, not through the page cache: the whole blocks that hold it, into
        the first aligned byte of `out`; the returned view starts where the range does."""
        begin, end = pos - pos % DIRECT_ALIGN, pos + nbytes
        shift = -out.data_ptr() % DIRECT_ALIGN
        span = whole_blocks(end) - begin
        fd = self._direct_fd(ref.file)
        if fd is None or shift + span > out.numel():
            return self._pread(self._fds[ref.file], pos, out[:nbytes], ref)
        view, done = memoryview(out.numpy())[shift : shift + span], 0
        while done < end - begin:  # the last block may end past the end of the file: a short read
            try:
                got = os.preadv(fd, [view[done:]], begin + done)
            except OSError as e:
                if e.errno != errno.EINVAL or done:
                    raise
                # opened with O_DIRECT but wanting another alignment: through the page cache from now on
                os.close(fd)
                self._direct_fds[ref.file] = None
                return self._pread(self._fds[ref.file], pos, out[:nbytes], ref)
            if got <= 0 or (got % DIRECT_ALIGN and done + got < end - begin):
                raise _shrank(ref)
            done += got
        first = shift + pos - begin
        return out[first : first + nbytes]

    @staticmethod
    def _map(fd: int, pos: int, nbytes: int, ref: TensorRef) -> torch.Tensor:
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        if os.fstat(fd).st_size < pos + nbytes:
            raise _shrank(ref)
        mapping = mmap.mmap(fd, pos + nbytes - base, access=mmap.ACCESS_COPY, offset=base)
        try:
            mapping.madvise(MADV_POPULATE_READ, 0, len(mapping))
        except OSError as e:
            if e.errno != errno.EINVAL:  # EFAULT: the file shrank since the check above
                raise _shrank(ref) from None
            # a kernel before 5.14: the arithmetic takes the page faults instead
            mapping.madvise(mmap.MADV_WILLNEED, 0, len(mapping))
        return torch.frombuffer(mapping, dtype=torch.uint8, offset=pos - base, count=nbytes)

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()
        self._state_dicts.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
