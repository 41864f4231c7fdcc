"""`torch.distributed.checkpoint` (DCP) folders, indexed without loading them: which bytes hold each tensor.

A DCP folder is a `.metadata` pickle (each entry's global size, dtype and chunks, and where each chunk's
record lies: a byte range of a `__R_K.distcp` file) and the `.distcp` files. Each record is one
`torch.save` archive, a zip whose tensor storage is an uncompressed member, so a chunk's bytes are a
plain byte range of the `.distcp` file: found from the record's zip directory and its small `data.pkl`,
never by loading the record, and then read, hashed and cached like a safetensors tensor's.

Both pickles are input from elsewhere, so they are read by unpicklers that know a fixed list of classes
(torch's DCP metadata classes; tensor rebuilds and storage types) and refuse every other one
(`UnsafeCheckpointError`, exit 2) before it is imported, let alone called.

Read so far: whole tensors and row-sharded ones (FSDP's `Shard(0)`: each rank's chunk one range of the
flattened tensor; the chunks must cover it exactly once), model tensors only (optimizer state,
`train_state` and other entries are left out). Tensor-parallel column shards are refused, saying so.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError, InputError, UnsafeCheckpointError

METADATA = ".metadata"
# entries that are training state, not model weights, by the prefixes the trainers give them
NOT_MODEL = ("optim.", "optimizer.", "optim_", "optimizer_", "train_state.", "lr_scheduler.", "dataloader.",
             "scheduler.", "rng_state.", "trainer.")
_DCP = "torch.distributed.checkpoint.metadata"
_METADATA_CLASSES = {
    (_DCP, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                              "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("collections", "OrderedDict")}


def is_dcp(folder: Path) -> bool:
    return (folder / METADATA).is_file()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refusing to unpickle {module}.{name}: not one of DCP's metadata classes")


@dataclasses.dataclass(frozen=True)
class _Storage:
    dtype: torch.dtype
    key: str


@dataclasses.dataclass(frozen=True)
class _Rebuilt:
    storage: _Storage
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild(storage, storage_offset, size, stride, *_):
    return _Rebuilt(storage, int(storage_offset), tuple(size), tuple(stride))


class _RecordUnpickler(pickle.Unpickler):
    """Reads a `torch.save`d tensor's `data.pkl` into where its bytes are, creating no tensor."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        if module == "torch" and name.endswith("Storage"):
            with warnings.catch_warnings():  # (torch's typed storages are deprecated, and still what it pickles)
                warnings.simplefilter("ignore")
                storage = getattr(torch, name, None)
                if isinstance(getattr(storage, "dtype", None), torch.dtype):
                    return storage
        raise UnsafeCheckpointError(f"refusing to unpickle {module}.{name} in a DCP record")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r} in a DCP record")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _Storage(pid[1].dtype, str(pid[2]))


class _Slice(io.RawIOBase):
    """A read-only window [start, start + length) of a file, for zipfile to read one record's directory."""

    def __init__(self, f, start: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def member_data_offset(f, member: zipfile.ZipInfo, base: int = 0) -> int | None:
    """Where the bytes of an uncompressed zip member start in the open file `f`, for a zip that starts at
    `base` (a `torch.save` archive: a `.bin`, or a DCP record): past its local header, whose own name and
    extra lengths decide; None for a compressed member or a header that is not one."""
    if member.compress_type != zipfile.ZIP_STORED:
        return None
    f.seek(base + member.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return base + member.header_offset + 30 + name_len + extra_len


def _record_tensor(file: Path, offset: int, length: int, fqn: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    """(dtype, shape, absolute byte offset) of the tensor saved in one record."""
    bad = CorruptCheckpointError(f"{file}: the record of {fqn!r} at byte {offset} is not a readable tensor")
    try:
        with open(file, "rb") as f:
            if f.seek(0, 2) < offset + length:
                raise CorruptCheckpointError(f"{file}: truncated ({fqn!r} needs bytes up to {offset + length})")
            with zipfile.ZipFile(_Slice(f, offset, length)) as z:
                names = {i.filename.split("/", 1)[-1]: i for i in z.infolist()}
                if "data.pkl" not in names:
                    raise bad
                rebuilt = _RecordUnpickler(io.BytesIO(z.read(names["data.pkl"]))).load()
                if not isinstance(rebuilt, _Rebuilt):
                    raise bad
                member = names.get(f"data/{rebuilt.storage.key}")
                data = None if member is None else member_data_offset(f, member, offset)
                if data is None:
                    raise bad
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, KeyError, AttributeError):
        raise bad from None
    except OSError as e:
        raise CorruptCheckpointError(f"{file}: cannot read the record of {fqn!r} ({e})") from None
    size, stride, dtype = rebuilt.size, rebuilt.stride, rebuilt.storage.dtype
    contiguous = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    if any(st != c for st, c, d in zip(stride, contiguous, size, strict=True) if d > 1):
        raise CorruptCheckpointError(f"{file}: the record of {fqn!r} is not stored contiguously")
    at = data + rebuilt.storage_offset * dtype.itemsize
    if at + math.prod(size) * dtype.itemsize > data + member.file_size:
        raise bad
    return dtype, size, at


def read_metadata(folder: Path):
    """The folder's DCP `Metadata`, unpickled with the allow-list."""
    path = folder / METADATA
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CorruptCheckpointError(f"{path}: not a DCP metadata file ({type(e).__name__}: {e})") from None
    if type(metadata).__name__ != "Metadata" or not hasattr(metadata, "state_dict_metadata"):
        raise CorruptCheckpointError(f"{path}: not a DCP metadata file")
    return metadata


Piece = tuple[Path, int, int, int]  # file, byte offset, first element (of the flattened tensor), count


def _flat_range(fqn: str, shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...],
                folder: Path) -> tuple[int, int]:
    """(first element, count) of a chunk in the flattened tensor. A chunk is one range of it when it
    spans every dimension after its first (FSDP's row shards); others (tensor-parallel column shards)
    are refused for now."""
    if len(offsets) != len(shape) or len(sizes) != len(shape) or \
            any(o < 0 or o + n > d for o, n, d in zip(offsets, sizes, shape, strict=True)):
        raise CorruptCheckpointError(f"{folder / METADATA}: a chunk of {fqn!r} lies outside its {list(shape)}")
    if not shape:
        return 0, 1
    inner = math.prod(shape[1:])
    if tuple(sizes[1:]) != tuple(shape[1:]) and math.prod(sizes):
        raise InputError(f"{folder}: tensor {fqn!r} is sharded along a dimension other than its first (a "
                         f"tensor-parallel save): ckptavg reads row-sharded (FSDP) and whole tensors so far")
    return offsets[0] * inner, math.prod(sizes)


def index(folder: Path) -> tuple[list[Path], dict[str, tuple[torch.dtype, tuple[int, ...], list[Piece]]]]:
    """The `.distcp` files holding model tensors, and per tensor name (as saved): dtype, shape and the
    pieces that hold it, in element order, each a byte range of a file. A sharded tensor's chunks must
    cover it exactly once. Every check happens here, before a byte of tensor data is read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(folder)
    storage = {(k.fqn, tuple(k.offset) if k.offset is not None else None): v
               for k, v in metadata.storage_data.items()}
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], list[Piece]]] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata) or fqn.startswith(NOT_MODEL):
            continue
        shape = tuple(entry.size)
        pieces: list[Piece] = []
        for chunk in entry.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            first, count = _flat_range(fqn, shape, offsets, sizes, folder)
            if not count and shape:
                continue
            info = storage.get((fqn, offsets))
            if info is None:
                raise CorruptCheckpointError(f"{folder / METADATA}: no storage recorded for a chunk of {fqn!r}")
            if getattr(info, "transform_descriptors", None):
                raise InputError(f"{folder}: tensor {fqn!r} is stored transformed ({info.transform_descriptors}): "
                                 f"not read by ckptavg")
            file = folder / str(info.relative_path)
            if not file.is_file():
                raise CorruptCheckpointError(f"{folder}: {file.name} is missing (it holds tensor {fqn!r})")
            dtype, size, at = _record_tensor(file, int(info.offset), int(info.length), fqn)
            if dtype != entry.properties.dtype or size != sizes:
                raise CorruptCheckpointError(f"{file}: a record of {fqn!r} holds {dtype} {list(size)}, the "
                                             f"metadata says {entry.properties.dtype} {list(sizes)}")
            pieces.append((file, at, first, count))
        pieces.sort(key=lambda piece: piece[2])
        covered = 0
        for _, _, first, count in pieces:
            if first != covered:
                what = "overlap" if first < covered else "leave a gap"
                raise CorruptCheckpointError(f"{folder}: the chunks of tensor {fqn!r} {what} at element "
                                             f"{min(first, covered)} (a save from another rank missing or "
                                             f"not finished?)")
            covered += count
        if covered != math.prod(shape):
            raise CorruptCheckpointError(f"{folder}: the chunks of tensor {fqn!r} cover {covered} of its "
                                         f"{math.prod(shape)} elements")
        tensors[fqn] = (entry.properties.dtype, shape, pieces)
    if not tensors:
        raise InputError(f"{folder}: a DCP checkpoint without model tensors")
    return sorted({piece[0] for t in tensors.values() for piece in t[2]}), tensors
