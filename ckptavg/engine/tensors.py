"""A lazy index over the tensors of one checkpoint, and the readers that fetch their bytes.

Opening a checkpoint reads metadata only: safetensors headers (parsed here, because the
averaging engine needs each tensor's byte offset to read it with large `pread` calls
instead of page faults), the pickle of a zipfile `.bin` loaded with
`torch.load(mmap=True, weights_only=True)` (whose storages stay on disk, each tensor found at its
byte offset in the zip), or a DCP folder's metadata (`dcp.py`).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import json
import math
import mmap
import os
import pickle
import struct
import sys
import warnings
import zipfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError, InputError, UnsafeCheckpointError, with_path
from ..formats import WEIGHT_LAYOUTS
from . import dcp

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors crate's own limit


@dataclass(frozen=True)
class Extent:
    """Elements [first, first + count) of a flattened tensor, stored in order at `offset` of `file`: one
    rank's shard of a sharded save."""

    file: Path
    offset: int
    first: int
    count: int


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives. `offset` is its absolute byte offset in `file`; None for a `.bin` tensor
    without one (see `_bin_refs`), which is copied out of torch's mapping of the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int | None
    # a tensor stored in several pieces (a sharded save), in element order, covering it exactly once;
    # empty: all of it at `offset` of `file`
    extents: tuple[Extent, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The elements where one stored piece ends and the next begins: no read crosses one."""
        return tuple(e.first for e in self.extents[1:])

    def at(self, start: int) -> tuple[TensorRef, int]:
        """The piece that holds element `start`, as a tensor of its own, and `start` within it: what the
        reader and the hashers are given, so that they know nothing of sharding."""
        if not self.extents:
            return self, start
        e = self.extents[bisect.bisect_right([x.first for x in self.extents], start) - 1]
        return TensorRef(self.name, self.dtype, (e.count,), e.file, e.offset), start - e.first

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder (or single weight file) and its tensor index."""

    path: Path
    format: str  # "safetensors" | "bin" | "dcp"
    files: tuple[Path, ...]
    tensors: dict[str, TensorRef]
    label: str | None = None  # what errors call it (a trajectory's revision name); the path by default

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def shown(self) -> str:
        return self.label or str(self.path)


def read_safetensors_header(file: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Parse and fully validate a safetensors header, so a truncated file fails before any work."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(f"{file}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CorruptCheckpointError(f"{file}: corrupt or truncated safetensors header")
            raw = f.read(n)
    except OSError as e:  # unreadable (permissions, EIO): the CLI's one line for the operating system's errors
        raise with_path(e, file) from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise CorruptCheckpointError(f"{file}: corrupt safetensors header (not JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    refs: dict[str, TensorRef] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{file}: bad header entry for tensor {name!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CorruptCheckpointError(f"{file}: tensor {name!r} has inconsistent data offsets")
        refs[name] = TensorRef(name, dtype, shape, file, data_start + begin)
        spans.append((begin, end))
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise CorruptCheckpointError(f"{file}: tensor data overlaps or leaves gaps")
        covered = end
    if data_start + covered != size:
        what = "truncated" if data_start + covered > size else "has trailing bytes"
        raise CorruptCheckpointError(
            f"{file}: {what} (header needs {data_start + covered} bytes, file has {size})"
        )
    return refs, metadata


def _is_zipfile(file: Path) -> bool:
    with open(file, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_torch_bin(file: Path) -> dict[str, torch.Tensor]:
    """Open a `.bin` state dict without executing code from it.

    Zipfile checkpoints are memory-mapped, so their tensors cost no anonymous memory.
    Legacy (pre-1.6, non-zip) files cannot be mapped: they are loaded whole, still with
    `weights_only=True`, and a warning says so.
    """
    try:
        zipped = _is_zipfile(file)
    except OSError as e:
        raise with_path(e, file) from None
    if zipped:
        try:
            zipfile.ZipFile(file).close()
        except zipfile.BadZipFile:
            raise CorruptCheckpointError(f"{file}: truncated or corrupt zip checkpoint") from None
    else:
        warnings.warn(f"{file} is a legacy (non-zip) checkpoint: it is loaded whole into memory", stacklevel=2)
    try:
        sd = torch.load(file, map_location="cpu", mmap=zipped, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{file}: refusing to unpickle: it needs more than weights_only=True allows ({first})"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CorruptCheckpointError(f"{file}: cannot load ({str(e).splitlines()[0]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CorruptCheckpointError(f"{file}: not a state dict of tensors")
    return sd


def _storage_offsets(file: Path) -> list[int]:
    """Where each storage's bytes start in a zip `.bin`, sorted: torch.save writes every storage as a
    member of its own, stored uncompressed (none where one is not: then no offsets at all)."""
    found = []
    with zipfile.ZipFile(file) as z, open(file, "rb") as f:
        for info in z.infolist():
            if info.filename.split("/", 1)[-1].startswith("data/"):
                at = dcp.member_data_offset(f, info)
                if at is None:
                    return []
                found.append(at)
    return sorted(found)


def _bin_refs(file: Path) -> dict[str, TensorRef]:
    """Each tensor of a `.bin` with its byte offset in the file, where it has one: `torch.load` maps the
    whole file once, so a storage's address less the mapping's start is where its member's bytes start,
    and a contiguous tensor's bytes are its storage's from its storage offset. With offsets, `.bin`
    files are read like safetensors (mapped, or direct from disk, and hashed from the same bytes);
    a tensor without one (a legacy file, a strided view) is copied out of torch's mapping."""
    sd = load_torch_bin(file)
    offsets = _storage_offsets(file) if _is_zipfile(file) else []
    ptrs = {id(v): v.untyped_storage().data_ptr() for v in sd.values()}
    known = set(offsets)
    used = {ptrs[id(v)] for v in sd.values() if v.untyped_storage().nbytes()}  # (an empty one may sit anywhere)
    # the mapping's start: the one that puts every storage at the start of a member
    base = next((b for b in (min(used) - off for off in offsets) if all(p - b in known for p in used)), None) \
        if used and offsets else None
    refs = {}
    for k, v in sd.items():
        at = None
        start = ptrs[id(v)] - base if base is not None else None
        if start in known and v.is_contiguous() and \
                (v.storage_offset() + v.numel()) * v.element_size() <= v.untyped_storage().nbytes():
            at = start + v.storage_offset() * v.element_size()
        refs[k] = TensorRef(k, v.dtype, tuple(v.shape), file, at)
    return refs


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CorruptCheckpointError(f"{index_file}: not a valid weight index") from None
    return weight_map


def open_checkpoint(path: str | os.PathLike, label: str | None = None) -> Checkpoint:
    """Index a Hugging Face model folder, a DCP folder (`dcp.py`) or one weight file without reading
    tensor data.
    `label` names it in error messages (a revision rather than a cache path)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".safetensors":
            fmt, files, index = "safetensors", [path], None
        elif path.suffix in (".bin", ".pt", ".pth"):
            fmt, files, index = "bin", [path], None
        else:
            raise InputError(f"{path}: unknown checkpoint format (expected .safetensors or .bin)")
    elif dcp.is_dcp(path):
        files, found = dcp.index(path)
        tensors = {}
        for k, (dtype, shape, pieces) in found.items():
            extents = tuple(Extent(*piece) for piece in pieces) if len(pieces) > 1 else ()
            file, at = pieces[0][:2] if pieces else (files[0], 0)  # (an empty tensor has no bytes to read)
            tensors[k] = TensorRef(k, dtype, shape, file, at, extents)
        return Checkpoint(path, "dcp", tuple(files), tensors, label)
    else:
        for name, fmt in WEIGHT_LAYOUTS:  # noqa: B007  (the one found is used below)
            if (path / name).is_file():
                break
        else:
            wanted = ", ".join(n for n, _ in WEIGHT_LAYOUTS)
            raise InputError(f"{path}: no weights found (looked for {wanted})")
        if name.endswith(".index.json"):
            index = _read_index(path / name)
            shards = sorted(set(index.values()))
            files = [path / s for s in shards]
            for f in files:
                if not f.is_file():
                    raise CorruptCheckpointError(f"{path / name}: names missing shard {f.name}")
        else:
            files, index = [path / name], None

    tensors: dict[str, TensorRef] = {}
    for f in files:
        refs = read_safetensors_header(f)[0] if fmt == "safetensors" else _bin_refs(f)
        for key, ref in refs.items():
            if index is not None and index.get(key) != f.name:
                continue  # a shard may hold stray copies; the index decides
            if key in tensors:
                raise CorruptCheckpointError(f"{path}: tensor {key!r} appears in two files")
            tensors[key] = ref
    if index is not None:
        missing = sorted(set(index) - set(tensors))
        if missing:
            raise CorruptCheckpointError(
                f"{path}: index lists {len(missing)} tensor(s) its shards lack, e.g. {missing[0]!r}"
            )
    if not tensors:
        raise InputError(f"{path}: checkpoint holds no tensors")
    return Checkpoint(path, fmt, tuple(files), tensors, label)


# madvise(MADV_POPULATE_READ): Linux 5.14+, not named by Python's mmap module before 3.13
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
# mincore(2), through ctypes: the kernel's page-by-page answer to "is this range in the page cache?"
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
# Direct I/O moves whole blocks from aligned memory: 4096 covers 512-byte and 4K-sector devices.
DIRECT_ALIGN = 4096
# Spare bytes a buffer needs beyond a range's own for `TensorReader` to read it direct: the distance to
# the buffer's first aligned byte, and the range's first and last blocks read whole.
DIRECT_SLACK = 3 * DIRECT_ALIGN


def whole_blocks(nbytes: int) -> int:
    """`nbytes` rounded up to whole direct-I/O blocks."""
    return -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN


def _cached(fd: int, pos: int, nbytes: int) -> bool:
    """Whether every page of a range is in the page cache, as mincore(2) reports for a mapping of it,
    which reads nothing. (A one-byte read that may not wait, RWF_NOWAIT, tried before, starts
    read-ahead where it misses: the next average of a sliding window then found the ends of its ranges
    cached and mapped whole ranges that were on disk.) Anything unexpected counts as not cached: the
    range is then read, which is always right."""
    if _libc is None or nbytes <= 0:
        return False
    base = pos - pos % mmap.ALLOCATIONGRANULARITY
    length = pos + nbytes - base
    try:
        mapping = mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=base)
    except (OSError, ValueError):
        return False
    try:
        pages = (ctypes.c_ubyte * -(-length // mmap.PAGESIZE))()
        start = ctypes.c_char.from_buffer(mapping)
        try:
            status = _libc.mincore(ctypes.addressof(start), length, pages)
        finally:
            del start  # the mapping cannot close while a ctypes object points into it
        return status == 0 and all(page & 1 for page in bytes(pages))
    finally:
        mapping.close()


def _shrank(ref: TensorRef) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{ref.file}: file shrank while reading {ref.name!r}")


class TensorReader:
    """Fetches byte ranges of tensors, into caller-owned buffers or as views of the file.

    With `map_files`, a safetensors file that is in the page cache is mapped (private, so torch may
    treat it as writable; it is never written, so no page is copied) and faulted in at once with
    MADV_POPULATE_READ, in the reader's thread: no copy out of the page cache, which measured 6-8x
    less CPU than `pread`. Without it (pinned buffers bound for a GPU) a cached range is copied out of
    the cache with `preadv`. Whether a range is cached is asked of the kernel, page by page (mincore),
    not guessed from timings, so a reader thread that lost its core for a moment never mistakes the
    page cache for a disk.

    A file with a range that was not cached is read from there to its end straight from the disk
    into the caller's buffer (O_DIRECT, whole aligned blocks; `DIRECT_SLACK` spare bytes in the buffer
    make room for the alignment), even where read-ahead has cached what follows. Mapping pages that
    read-ahead had just brought in cost the arithmetic up to three times the CPU of reading them
    (cold 1B-shaped k=5 inputs: 8.8-21.7 against 5.4-6.8 s, `bench/stages.py`), and reading through
    the page cache at all cost the reader thread 25-27 s of CPU for those 10.5 GB against 0.8-1.0 s
    direct, and the average 27-29 s of wall time against 9.7-10.7 s in three runs of four (20.8 s in
    the first; hashed or not, alternated). It also leaves a 12B model's 24 GB per checkpoint out of a
    cache they would only churn. A filesystem that refuses direct I/O, or a buffer without the spare
    bytes, gets plain `preadv`, and so do `keep_cached` files: a later average reads them again (a
    sliding window's shared checkpoints), and finding them in the page cache beats reading them again
    from disk (six k=5 windows 1000 steps apart, `bench/window.sh`: 51-53 s against 67-69 s with
    every file direct).
    Either way one call per piece, sequential within each file. `.bin` tensors with a byte offset are
    read the same way; the others are copied out of `torch.load`'s mapping.
    """

    def __init__(self, map_files: bool = False, keep_cached: Collection[Path] = ()) -> None:
        self.map_files = map_files
        self.keep_cached = frozenset(keep_cached)
        self._from_disk: set[Path] = set()  # files with a range that was not in the page cache
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int | None] = {}  # None: the filesystem refuses direct I/O
        self._state_dicts: dict[Path, dict[str, torch.Tensor]] = {}

    def read(self, ref: TensorRef, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [start, start+count) of `ref` as a typed 1-D tensor: a view of `out` (a uint8
        buffer) filled with them, or, with `map_files`, of the file itself (valid while referenced)."""
        try:
            return self._read(ref, start, count, out)
        except OSError as e:  # EIO, a file that vanished or lost its permissions mid-run: name it
            raise with_path(e, ref.file) from None

    def _read(self, ref: TensorRef, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        nbytes = count * ref.dtype.itemsize
        if ref.offset is None:
            sd = self._state_dicts.get(ref.file)
            if sd is None:
                sd = self._state_dicts[ref.file] = load_torch_bin(ref.file)
            typed = out[:nbytes].view(ref.dtype)
            typed.copy_(sd[ref.name].reshape(-1)[start : start + count])
            return typed
        fd = self._fds.get(ref.file)
        if fd is None:
            fd = self._fds[ref.file] = os.open(ref.file, os.O_RDONLY)
        pos = ref.offset + start * ref.dtype.itemsize
        if nbytes and ref.file not in self._from_disk and not _cached(fd, pos, nbytes):
            self._from_disk.add(ref.file)
        from_disk = ref.file in self._from_disk
        if from_disk and ref.file not in self.keep_cached:
            data = self._read_direct(ref, pos, nbytes, out)
        elif self.map_files and nbytes and not from_disk:
            data = self._map(fd, pos, nbytes, ref)
        else:  # cached, bound for a GPU; or from disk and kept in the cache for a later average
            data = self._pread(fd, pos, out[:nbytes], ref)
        return data.view(ref.dtype)

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
