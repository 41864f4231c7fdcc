"""`torch.distributed.checkpoint` (DCP) folders, indexed without loading them: which bytes hold each tensor.

A DCP folder is a `.metadata` pickle (each entry's global size, dtype and chunks, and where each chunk's
record lies: a byte range of a `__R_K.distcp` file) and the `.distcp` files. Each record is one
`torch.save` archive, a zip whose tensor storage is an uncompressed member, so a chunk's bytes are a
plain byte range of the `.distcp` file: found from the record's zip directory and its small `data.pkl`,
never by loading the record, and then read, hashed and cached like a safetensors tensor's.

Both pickles are input from elsewhere. They are read into records (`pickles.py`, which executes nothing)
that may name only a fixed list of classes (torch's DCP metadata classes; tensor rebuilds and storage types),
and the metadata's records are then read into this module's own typed ones (`Metadata`, `TensorEntry`,
`Chunk`, `StorageInfo`), checking every type, size and count, and that every file named lies in the folder.

Whole tensors and sharded ones are read: a row shard (FSDP's `Shard(0)`, megatron's per-layer chunks) is
one range of the flattened tensor, a column shard (tensor parallelism's `Shard(1)`) one range per row;
the chunks must cover each tensor exactly once. Model tensors only: optimizer state, `train_state` and
other entries are left out.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpointError, InputError, UnsafeCheckpointError, with_path
from . import torchsave
from .confine import inside
from .index import Checkpoint, Extent, TensorRef
from .names import DCP_SIDE_FILES, DCP_SUBFOLDER_OF, SIDE_FILES, dcp_metadata
from .outputs import (
    Format,
    OutputFile,
    OutputLayout,
    SideFiles,
    Spec,
    fake,
    saved_without_data,
    spec_nbytes,
    split_sizes,
)
from .pickles import Call, Name, read_pickle

METADATA = ".metadata"
MAX_METADATA_BYTES = 1 << 30
# pieces of tensors one checkpoint may be read in (a column shard is a piece a row): each holds at least one
# element of a record that is there, and this bounds what their index costs (about 150 bytes each)
MAX_EXTENTS = 1 << 24
MAX_DIMS = 64
# entries that are training state, not model weights, by the prefixes the trainers give them
NOT_MODEL = ("optim.", "optimizer.", "optim_", "optimizer_", "train_state.", "lr_scheduler.", "dataloader.",
             "scheduler.", "rng_state.", "trainer.")
_DCP = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"
_METADATA_CLASSES = {
    (_DCP, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                              "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    # megatron-core keeps its save plans in the metadata (`planner_data`): torch's planner dataclasses
    ("torch.distributed.checkpoint.planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType",
                                                                "TensorWriteData", "BytesIOWriteData")
} | {(_FILESYSTEM, "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
     # OLMo-core's writer records its own `_StorageInfo` (relative_path, offset, length): torch's less a field
     ("olmo_core.distributed.checkpoint.filesystem", "_StorageInfo")
} | {("torch", n) for n in torchsave.DTYPES}


# the metadata classes that are hashable (frozen dataclasses, enums, paths): the only records a key may be
_HASHABLE = {(_DCP, "MetadataIndex"), (_DCP, "_MEM_FORMAT_ENCODING"), ("torch", "Size"), ("pathlib", "PosixPath"),
             ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.planner", "WriteItemType")}


_GET_LAYOUT = Name("torch.serialization", "_get_layout")
_STRIDED = object()  # (a dict state without a layout: torch's default, strided)


@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class BytesEntry:
    """An entry saved as bytes (megatron-core's `_extra_state`, torchtitan's data loader state)."""


@dataclass(frozen=True)
class StorageInfo:
    """Where one chunk's (or bytes entry's) record lies: a byte range of a file of the folder."""

    file: str
    offset: int
    length: int
    transformed: bool = False  # saved through a transform (compression) ckptavg does not read


@dataclass(frozen=True)
class Metadata:
    """A DCP folder's metadata, as ckptavg reads it: each entry, and where each chunk's record lies, by (fqn,
    the chunk's offsets; None for a bytes entry)."""

    entries: dict[str, TensorEntry | BytesEntry]
    storage: dict[tuple[str, tuple[int, ...] | None], StorageInfo]


def _training_state(fqn: str) -> bool:
    """An entry of the optimizer's, scheduler's, data loader's or trainer's (the entry itself, as
    torchtitan's `dataloader`, or anything under it)."""
    return fqn.startswith(NOT_MODEL) or f"{fqn}." in NOT_MODEL


def is_dcp(folder: Path) -> bool:
    return bool(dcp_metadata(e.name for e in folder.iterdir()))


class _Schema:
    """Reads the records of one `.metadata` pickle into typed ones, refusing anything else."""

    def __init__(self, where: str) -> None:
        self.where = where

    def bad(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: not a DCP metadata file ({what})")

    def state(self, value: Any, cls: str, module: str = _DCP) -> dict:
        """The state (a dataclass's fields) of a record of `module.cls`."""
        if not isinstance(value, Call) or value.func != Name(module, cls) and not (
                cls == "_StorageInfo" and value.func.name == cls):
            raise self.bad(f"a {cls} expected")
        state = value.state if value.built else {}
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:  # (no dict, slot state)
            state = state[1]
        if not isinstance(state, dict) or value.args != () or value.items or value.values:
            raise self.bad(f"a malformed {cls}")
        return state

    def ints(self, value: Any, what: str) -> tuple[int, ...]:
        if isinstance(value, Call) and value.func == Name("torch", "Size") and len(value.args) == 1:
            value = value.args[0]
        if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS or \
                not all(type(v) is int and 0 <= v < 1 << 62 for v in value):
            raise self.bad(f"a {what} that is not a list of non-negative integers")
        return tuple(value)

    def number(self, value: Any, what: str) -> int:
        if type(value) is not int or not 0 <= value < 1 << 62:
            raise self.bad(f"a {what} that is not a non-negative integer")
        return value

    def dtype(self, properties: Any) -> torch.dtype:
        if not isinstance(properties, Call) or properties.func != Name(_DCP, "TensorProperties"):
            raise self.bad("a TensorProperties expected")
        state = properties.state  # (torch's __setstate__ takes five fields; older versions pickled a dict)
        name = state[0] if isinstance(state, tuple) and len(state) == 5 else state.get("dtype") \
            if isinstance(state, dict) else None
        if not isinstance(name, Name) or name.module != "torch" or name.name not in torchsave.DTYPES:
            raise self.bad("a tensor without a dtype")
        layout = state[1] if isinstance(state, tuple) else state.get("layout", _STRIDED)
        strided = layout is _STRIDED or layout == Name("torch", "strided") or isinstance(layout, Call) and \
            layout.func == _GET_LAYOUT and layout.args == ("torch.strided",)
        if not strided:
            raise self.bad("a tensor whose layout is not torch.strided (sparse tensors are not averaged)")
        return torchsave.DTYPES[name.name]

    def entry(self, value: Any) -> TensorEntry | BytesEntry:
        if isinstance(value, Call) and value.func == Name(_DCP, "BytesStorageMetadata"):
            return BytesEntry()
        state = self.state(value, "TensorStorageMetadata")
        size = self.ints(state.get("size"), "tensor size")
        chunks = state.get("chunks")
        if not isinstance(chunks, list):
            raise self.bad("a tensor without a list of chunks")
        read = []
        for c in chunks:
            fields = self.state(c, "ChunkStorageMetadata")
            read.append(Chunk(self.ints(fields.get("offsets"), "chunk offset"),
                              self.ints(fields.get("sizes"), "chunk size")))
        return TensorEntry(self.dtype(state.get("properties")), size, tuple(read))

    def storage(self, key: Any, value: Any) -> tuple[tuple[str, tuple[int, ...] | None], StorageInfo]:
        index = self.state(key, "MetadataIndex")
        fqn, offset = index.get("fqn"), index.get("offset")
        if not isinstance(fqn, str):
            raise self.bad("an entry whose name is not a string")
        info = self.state(value, "_StorageInfo", _FILESYSTEM)
        path = info.get("relative_path")
        if isinstance(path, Call) and path.func.module == "pathlib" and all(isinstance(a, str) for a in path.args):
            path = "/".join(path.args)
        if not isinstance(path, str):
            raise self.bad(f"the file of {fqn!r} is not named by a string")
        return ((fqn, None if offset is None else self.ints(offset, "chunk offset")),
                StorageInfo(path, self.number(info.get("offset"), "record offset"),
                            self.number(info.get("length"), "record length"),
                            bool(info.get("transform_descriptors"))))

    def metadata(self, value: Any) -> Metadata:
        state = self.state(value, "Metadata")
        entries, storage = state.get("state_dict_metadata"), state.get("storage_data")
        if not isinstance(entries, dict) or not isinstance(storage, dict):
            raise self.bad("no entries or no storage records")
        read = {}
        for fqn, entry in entries.items():
            if not isinstance(fqn, str):
                raise self.bad("an entry whose name is not a string")
            read[fqn] = self.entry(entry)
        where = {}
        for key, info in storage.items():
            k, v = self.storage(key, info)
            if k in where:
                raise self.bad(f"two storage records for one chunk of {k[0]!r}")
            where[k] = v
        return Metadata(read, where)


def read_metadata(folder: Path) -> Metadata:
    """The folder's DCP metadata, read into typed records: its `.metadata`, or, for a save made without
    collectives, every rank's `__R.metadata` merged (ranks 0 to N-1, none missing)."""
    names = dcp_metadata(e.name for e in folder.iterdir())
    if names == [METADATA]:
        return _read_one(inside(folder, METADATA, str(folder)))
    ranks = [int(n[2:-len(".metadata")]) for n in names]
    missing = next((i for i, r in enumerate(ranks) if r != i), None)
    if missing is not None:
        raise CorruptCheckpointError(f"{folder}: a save without a global .metadata, whose rank {missing} left no "
                                     f"__{missing}.metadata (not finished, or lost)")
    return _merged([_read_one(inside(folder, n, str(folder))) for n in names])


def _merged(parts: list[Metadata]) -> Metadata:
    """One `Metadata` of every rank's: each tensor's chunks from all of them (a replicated tensor's, which
    every rank saves, once), and where each chunk's record lies."""
    entries: dict[str, TensorEntry | BytesEntry] = {}
    storage: dict = {}
    for part in parts:
        for fqn, entry in part.entries.items():
            known = entries.get(fqn)
            if known is None:
                entries[fqn] = entry
            elif isinstance(entry, TensorEntry) and isinstance(known, TensorEntry):
                if (entry.dtype, entry.size) != (known.dtype, known.size):
                    raise CorruptCheckpointError(f"{fqn!r} has another dtype or size in one rank's metadata")
                seen = {c.offsets for c in known.chunks}
                entries[fqn] = TensorEntry(known.dtype, known.size,
                                           known.chunks + tuple(c for c in entry.chunks if c.offsets not in seen))
        for key, info in part.storage.items():
            storage.setdefault(key, info)
    return Metadata(entries, storage)


_last_read: tuple[tuple, Metadata] | None = None  # the newest input's, read again for its non-tensor entries


def _read_one(path: Path) -> Metadata:
    """One `.metadata` file's records; the file parsed last is not parsed again while its bytes are the same (an
    average reads the newest input's twice: for its tensors, then for the entries copied from it; parsing is
    the cost, about 2 MB/s, reading is not)."""
    global _last_read
    if not path.is_file():
        raise CorruptCheckpointError(f"{path}: not a file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_METADATA_BYTES + 1)
    except OSError as e:
        raise with_path(e, path) from None
    if len(data) > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(f"{path}: more than {MAX_METADATA_BYTES} bytes, more than ckptavg reads")
    key = (str(path), hashlib.blake2b(data, digest_size=16).digest())  # (what it holds, not when it changed)
    if _last_read is not None and _last_read[0] == key:
        return _last_read[1]
    try:
        records = read_pickle(data, str(path), names=_METADATA_CLASSES, hashable=_HASHABLE)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{e} (not one of DCP's metadata classes)") from None
    metadata = _Schema(str(path)).metadata(records)
    _last_read = (key, metadata)
    return metadata


def _record_tensor(f, file: Path, offset: int, length: int, fqn: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    """(dtype, shape, absolute byte offset) of the tensor saved in one record of the open file `f`."""
    where = f"{file}: the record of {fqn!r} at byte {offset}"
    try:
        archive = torchsave.read_archive(f, where, offset, length, strict=True)
    except OSError as e:
        raise CorruptCheckpointError(f"{file}: cannot read the record of {fqn!r} ({e})") from None
    t = torchsave.tensor_of(archive.obj, where)
    if t is None:
        raise CorruptCheckpointError(f"{where}: not a tensor")
    at = archive.locate(t, where)
    if at is None:
        raise CorruptCheckpointError(f"{where}: not one plain byte range (strided)")
    return t.dtype, t.size, at


def _check_chunk(fqn: str, shape: tuple[int, ...], chunk: Chunk, where: str) -> None:
    if len(chunk.offsets) != len(shape) or len(chunk.sizes) != len(shape) or \
            any(o + n > d for o, n, d in zip(chunk.offsets, chunk.sizes, shape, strict=True)):
        raise CorruptCheckpointError(f"{where}: a chunk of {fqn!r} lies outside its {list(shape)}")


def _run_layout(shape: tuple[int, ...], chunk: Chunk) -> tuple[int, int, int]:
    """(k, how many runs of the flattened tensor a chunk is, how long each is), where the chunk's dimensions
    from k on span the tensor's but for k itself: a row shard (FSDP's, megatron's per-layer chunks) is one
    run; a column shard (tensor parallelism) is one run per row of it."""
    if not shape:
        return 0, 1, 1
    k = len(shape) - 1
    while k > 0 and chunk.sizes[k] == shape[k]:
        k -= 1
    return k, math.prod(chunk.sizes[:k]), chunk.sizes[k] * math.prod(shape[k + 1:])


def _flat_runs(shape: tuple[int, ...], chunk: Chunk) -> Iterator[tuple[int, int]]:
    """The chunk's runs, in the chunk's own (row-major) order: (first element, count) each."""
    k, _, run = _run_layout(shape, chunk)
    if not shape:
        yield 0, 1
        return
    stride = [math.prod(shape[j + 1:]) for j in range(len(shape))]
    for outer in itertools.product(*(range(o, o + n) for o, n in zip(chunk.offsets[:k], chunk.sizes[:k],
                                                                      strict=True))):
        yield sum(i * st for i, st in zip(outer, stride, strict=False)) + chunk.offsets[k] * stride[k], run


def index(folder: Path) -> dict[str, TensorRef]:
    """Each model tensor (named as saved) with the extents that hold it, in element order, each a byte
    range of a `.distcp` file. A sharded tensor's chunks must cover it exactly once. Every check happens
    here, before a byte of tensor data is read."""
    metadata = read_metadata(folder)
    where = str(folder / METADATA)
    tensors: dict[str, TensorRef] = {}
    n_extents = 0
    with contextlib.ExitStack() as opened:
        files: dict[Path, Any] = {}
        paths: dict[str, Path] = {}  # each file a record names, checked once
        for fqn, entry in metadata.entries.items():
            if not isinstance(entry, TensorEntry) or _training_state(fqn):
                continue
            pieces: list[Extent] = []
            for chunk in entry.chunks:
                _check_chunk(fqn, entry.size, chunk, where)
                if not math.prod(chunk.sizes):
                    continue
                info = metadata.storage.get((fqn, chunk.offsets))
                if info is None:
                    raise CorruptCheckpointError(f"{where}: no storage recorded for a chunk of {fqn!r}")
                if info.transformed:
                    raise InputError(f"{folder}: tensor {fqn!r} is stored transformed (compressed): not read by "
                                     f"ckptavg")
                file = paths.get(info.file) or paths.setdefault(
                    info.file, inside(folder, info.file, f"{where}: the record of {fqn!r}"))
                if file not in files:
                    if not file.is_file():
                        raise CorruptCheckpointError(f"{folder}: {file.name} is missing (it holds tensor {fqn!r})")
                    files[file] = opened.enter_context(file.open("rb"))
                dtype, size, at = _record_tensor(files[file], file, info.offset, info.length, fqn)
                if dtype != entry.dtype or size != chunk.sizes:
                    raise CorruptCheckpointError(f"{file}: a record of {fqn!r} holds {dtype} {list(size)}, the "
                                                 f"metadata says {entry.dtype} {list(chunk.sizes)}")
                # (the record holds the chunk's elements: so its runs are no more than the bytes that are there)
                n_extents += _run_layout(entry.size, chunk)[1]
                if n_extents > MAX_EXTENTS:
                    raise CorruptCheckpointError(f"{folder}: its tensors are stored in more than {MAX_EXTENTS} "
                                                 f"pieces, more than ckptavg indexes")
                done = 0
                for first, count in _flat_runs(entry.size, chunk):
                    pieces.append(Extent(file, at + done * dtype.itemsize, first, count))
                    done += count
            pieces.sort(key=lambda e: e.first)
            _check_cover(folder, fqn, entry.size, pieces)
            head = pieces[0] if pieces else Extent(folder / METADATA, 0, 0, 0)  # (an empty tensor reads no bytes)
            tensors[fqn] = TensorRef(fqn, entry.dtype, entry.size, head.file, head.offset,
                                     tuple(pieces) if len(pieces) > 1 else ())
    if not tensors:
        raise InputError(f"{folder}: a DCP checkpoint without model tensors")
    return tensors


def _check_cover(folder: Path, fqn: str, shape: tuple[int, ...], pieces: list[Extent]) -> None:
    covered = 0
    for e in pieces:
        if e.first != covered:
            what = "overlap" if e.first < covered else "leave a gap"
            raise CorruptCheckpointError(f"{folder}: the chunks of tensor {fqn!r} {what} at element "
                                         f"{min(e.first, covered)} (a save from another rank missing or "
                                         f"not finished?)")
        covered += e.count
    if covered != math.prod(shape):
        raise CorruptCheckpointError(f"{folder}: the chunks of tensor {fqn!r} cover {covered} of its "
                                     f"{math.prod(shape)} elements")


def model_bytes(folder: Path) -> list[tuple[str, bytes]]:
    """The model's entries that are not tensors (megatron-core's `_extra_state` objects, saved as bytes),
    each as its saved bytes: small, and copied into an average from the newest input, for the trainer's
    loader to find every entry it saved."""
    metadata = read_metadata(folder)
    where = {fqn: info for (fqn, _), info in metadata.storage.items()}
    found = []
    for fqn, entry in metadata.entries.items():
        if not isinstance(entry, BytesEntry) or _training_state(fqn) or fqn not in where:
            continue
        info = where[fqn]
        if info.length > MAX_BYTES_ENTRY:
            raise CorruptCheckpointError(f"{folder / METADATA}: entry {fqn!r} is {info.length} bytes, more than "
                                         f"ckptavg copies ({MAX_BYTES_ENTRY})")
        file = inside(folder, info.file, f"{folder / METADATA}: entry {fqn!r}")
        try:
            with file.open("rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as e:
            raise CorruptCheckpointError(f"{folder}: cannot read entry {fqn!r} ({e})") from None
        if len(data) != info.length:
            raise CorruptCheckpointError(f"{file}: truncated (entry {fqn!r})")
        found.append((fqn, data))
    return found


MAX_BYTES_ENTRY = 1 << 30


def dcp_layout(specs: Sequence[Spec], shard_bytes: int, subfolder: str = "", raw: Sequence[tuple[str, bytes]] = ()
               ) -> OutputLayout:
    """A record per tensor, in files of at most `shard_bytes` (`__0_0.distcp`, `__1_0.distcp`, ...: DCP's names
    for the files of ranks 0, 1, ..., so that ranks can write one each), the `raw` entries (name, saved bytes: the
    model's non-tensor entries, `dcp.model_bytes`) after the last, and the `.metadata` that says where each lies;
    in `subfolder` of the output where the trainer keeps its DCP folder inside a step's (OLMo-core)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    records = []
    for spec in specs:
        saved = saved_without_data(fake(spec))
        parts, holes = saved.split()
        if [n for _, n in holes] != ([spec_nbytes(spec)] if spec_nbytes(spec) else []):
            raise RuntimeError(f"torch.save left {holes} unwritten for {spec}: not a record ckptavg can frame")
        records.append((spec, saved.size, parts))
    groups = split_sizes([size for _, size, _ in records], shard_bytes)
    inside = f"{subfolder}/" if subfolder else ""
    entries, storage, files = {}, {}, []
    for i, group in enumerate(groups):
        name, frames, at = f"__{i}_0.distcp", [b""], 0
        for spec, size, parts in (records[j] for j in group):
            frames[-1] += parts[0]
            frames.extend(parts[1:] or [b""])  # (an empty tensor: its no bytes go after its record)
            origin = torch.Size([0] * len(spec[2]))
            entries[spec[0]] = TensorStorageMetadata(TensorProperties(dtype=spec[1]), torch.Size(spec[2]),
                                                     [ChunkStorageMetadata(origin, torch.Size(spec[2]))])
            storage[MetadataIndex(spec[0], origin)] = _StorageInfo(name, at, size)
            at += size
        if i == len(groups) - 1:
            for key, data in raw:
                frames[-1] += data
                entries[key] = BytesStorageMetadata()
                storage[MetadataIndex(key)] = _StorageInfo(name, at, len(data))
                at += len(data)
        files.append(OutputFile(inside + name, tuple(records[j][0][0] for j in group), tuple(frames)))
    metadata = pickle.dumps(Metadata(state_dict_metadata=entries, storage_data=storage))
    return OutputLayout("dcp", tuple(files), ((inside + ".metadata", metadata),))


def _dcp_source(newest: Checkpoint) -> tuple[tuple[str, bytes], ...]:
    return tuple(model_bytes(newest.folder)) if newest.format == "dcp" else ()


def _dcp_side_files(newest: Checkpoint) -> SideFiles:
    """A trainer's config beside its step's folder, and (for a DCP input) what it keeps beside its DCP data, in
    the folder the output's DCP data goes to."""
    files = [(newest.step_folder, SIDE_FILES, "")]
    if newest.format == "dcp":
        files.append((newest.folder, DCP_SIDE_FILES, DCP_SUBFOLDER_OF.get(newest.trainer, "")))
    return files


FORMAT = Format("dcp", "dcp",
                lambda specs, shard_bytes, newest: dcp_layout(specs, shard_bytes,
                                                              DCP_SUBFOLDER_OF.get(newest.trainer, ""),
                                                              newest.source or ()),
                source=_dcp_source, side_files=_dcp_side_files)
