"""`torch.distributed.checkpoint` (DCP) folders, indexed without loading them: which bytes hold each tensor.

A DCP folder is a `.metadata` pickle (each entry's global size, dtype and chunks, and where each chunk's
record lies: a byte range of a `__R_K.distcp` file) and the `.distcp` files. Each record is one
`torch.save` archive, a zip whose tensor storage is an uncompressed member, so a chunk's bytes are a
plain byte range of the `.distcp` file: found from the record's zip directory and its small `data.pkl`,
never by loading the record, and then read, hashed and cached like a safetensors tensor's.

Both pickles are input from elsewhere, so they are read by unpicklers that know a fixed list of classes
(torch's DCP metadata classes; tensor rebuilds and storage types) and refuse every other one
(`UnsafeCheckpointError`, exit 2) before it is imported, let alone called.

Whole tensors and sharded ones are read: a row shard (FSDP's `Shard(0)`, megatron's per-layer chunks) is
one range of the flattened tensor, a column shard (tensor parallelism's `Shard(1)`) one range per row;
the chunks must cover each tensor exactly once. Model tensors only: optimizer state, `train_state` and
other entries are left out.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpointError, InputError, UnsafeCheckpointError
from . import torchsave
from .index import Extent, TensorRef
from .names import dcp_metadata

METADATA = ".metadata"
# entries that are training state, not model weights, by the prefixes the trainers give them
NOT_MODEL = ("optim.", "optimizer.", "optim_", "optimizer_", "train_state.", "lr_scheduler.", "dataloader.",
             "scheduler.", "rng_state.", "trainer.")
_DCP = "torch.distributed.checkpoint.metadata"
_METADATA_CLASSES = {
    (_DCP, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                              "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    # megatron-core keeps its save plans in the metadata (`planner_data`): torch's planner dataclasses
    ("torch.distributed.checkpoint.planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType",
                                                                "TensorWriteData", "BytesIOWriteData")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("collections", "OrderedDict")}
# classes that trainers pickle in place of torch's own, read as torch's (so no trainer need be installed):
# OLMo-core's writer records its `_StorageInfo` (relative_path, offset, length), torch's less one field
_STAND_INS = {("olmo_core.distributed.checkpoint.filesystem", "_StorageInfo"):
              ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


def _training_state(fqn: str) -> bool:
    """An entry of the optimizer's, scheduler's, data loader's or trainer's (the entry itself, as
    torchtitan's `dataloader`, or anything under it)."""
    return fqn.startswith(NOT_MODEL) or f"{fqn}." in NOT_MODEL


def is_dcp(folder: Path) -> bool:
    return bool(dcp_metadata(e.name for e in folder.iterdir()))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        module, name = _STAND_INS.get((module, name), (module, name))
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refusing to unpickle {module}.{name}: not one of DCP's metadata classes")


def _record_tensor(f, file: Path, offset: int, length: int, fqn: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    """(dtype, shape, absolute byte offset) of the tensor saved in one record of the open file `f`."""
    where = f"{file}: the record of {fqn!r} at byte {offset}"
    try:
        archive = torchsave.read_archive(f, where, offset, length, strict=True)
    except OSError as e:
        raise CorruptCheckpointError(f"{file}: cannot read the record of {fqn!r} ({e})") from None
    t = archive.obj
    if not isinstance(t, torchsave.Rebuilt):
        raise CorruptCheckpointError(f"{where}: not a tensor")
    at = archive.locate(t, where)
    if at is None:
        raise CorruptCheckpointError(f"{where}: not one plain byte range (strided or compressed)")
    return t.storage.dtype, t.size, at


def read_metadata(folder: Path):
    """The folder's DCP `Metadata`, unpickled with the allow-list: its `.metadata`, or, for a save made
    without collectives, every rank's `__R.metadata` merged (ranks 0 to N-1, none missing)."""
    names = dcp_metadata(e.name for e in folder.iterdir())
    if names == [METADATA]:
        return _read_one(folder / METADATA)
    ranks = [int(n[2:-len(".metadata")]) for n in names]
    if ranks != list(range(len(ranks))):
        missing = min(set(range(max(ranks) + 1)) - set(ranks))
        raise CorruptCheckpointError(f"{folder}: a save without a global .metadata, whose rank {missing} left no "
                                     f"__{missing}.metadata (not finished, or lost)")
    return _merged([_read_one(folder / n) for n in names])


def _merged(parts: list):
    """One `Metadata` of every rank's: each tensor's chunks from all of them (a replicated tensor's, which
    every rank saves, once), and where each chunk's record lies."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    entries: dict = {}
    storage: dict = {}
    for part in parts:
        for fqn, entry in part.state_dict_metadata.items():
            if fqn not in entries:
                entries[fqn] = entry
            elif isinstance(entry, TensorStorageMetadata):
                known = {tuple(c.offsets) for c in entries[fqn].chunks}
                entries[fqn].chunks.extend(c for c in entry.chunks if tuple(c.offsets) not in known)
        for key, info in part.storage_data.items():
            storage.setdefault(key, info)
    return Metadata(state_dict_metadata=entries, storage_data=storage)


def _read_one(path: Path):
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CorruptCheckpointError(f"{path}: not a DCP metadata file ({type(e).__name__}: {e})") from None
    if type(metadata).__name__ != "Metadata" or not hasattr(metadata, "state_dict_metadata"):
        raise CorruptCheckpointError(f"{path}: not a DCP metadata file")
    return metadata


def _flat_runs(fqn: str, shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...],
               folder: Path) -> list[tuple[int, int]]:
    """A chunk as the runs of the flattened tensor it holds, in the chunk's own (row-major) order:
    (first element, count) each. A row shard (FSDP's, megatron's per-layer chunks) is one run; a column
    shard (tensor parallelism) is one run per row of it."""
    if len(offsets) != len(shape) or len(sizes) != len(shape) or \
            any(o < 0 or o + n > d for o, n, d in zip(offsets, sizes, shape, strict=True)):
        raise CorruptCheckpointError(f"{folder / METADATA}: a chunk of {fqn!r} lies outside its {list(shape)}")
    if not shape:
        return [(0, 1)]
    if not math.prod(sizes):
        return []
    # the run: the chunk's last dimensions that span the tensor's, and the one before them
    k = len(shape) - 1
    while k > 0 and sizes[k] == shape[k]:
        k -= 1
    stride = [math.prod(shape[j + 1:]) for j in range(len(shape))]
    run = sizes[k] * stride[k]
    runs = []
    for outer in itertools.product(*(range(o, o + n) for o, n in zip(offsets[:k], sizes[:k], strict=True))):
        runs.append((sum(i * st for i, st in zip(outer, stride, strict=False)) + offsets[k] * stride[k], run))
    return runs


def index(folder: Path) -> dict[str, TensorRef]:
    """Each model tensor (named as saved) with the extents that hold it, in element order, each a byte
    range of a `.distcp` file. A sharded tensor's chunks must cover it exactly once. Every check happens
    here, before a byte of tensor data is read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(folder)
    storage = {(k.fqn, tuple(k.offset) if k.offset is not None else None): v
               for k, v in metadata.storage_data.items()}
    tensors: dict[str, TensorRef] = {}
    with contextlib.ExitStack() as opened:
        files: dict[Path, Any] = {}
        for fqn, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata) or _training_state(fqn):
                continue
            shape = tuple(entry.size)
            pieces: list[Extent] = []
            for chunk in entry.chunks:
                offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                runs = _flat_runs(fqn, shape, offsets, sizes, folder)
                if not runs:
                    continue
                info = storage.get((fqn, offsets))
                if info is None:
                    raise CorruptCheckpointError(f"{folder / METADATA}: no storage recorded for a chunk of {fqn!r}")
                if getattr(info, "transform_descriptors", None):
                    raise InputError(f"{folder}: tensor {fqn!r} is stored transformed "
                                     f"({info.transform_descriptors}): not read by ckptavg")
                file = folder / str(info.relative_path)
                if file not in files:
                    if not file.is_file():
                        raise CorruptCheckpointError(f"{folder}: {file.name} is missing (it holds tensor {fqn!r})")
                    files[file] = opened.enter_context(file.open("rb"))
                dtype, size, at = _record_tensor(files[file], file, int(info.offset), int(info.length), fqn)
                if dtype != entry.properties.dtype or size != sizes:
                    raise CorruptCheckpointError(f"{file}: a record of {fqn!r} holds {dtype} {list(size)}, the "
                                                 f"metadata says {entry.properties.dtype} {list(sizes)}")
                done = 0
                for first, count in runs:
                    pieces.append(Extent(file, at + done * dtype.itemsize, first, count))
                    done += count
            pieces.sort(key=lambda e: e.first)
            _check_cover(folder, fqn, shape, pieces)
            head = pieces[0] if pieces else Extent(folder / METADATA, 0, 0, 0)  # (an empty tensor reads no bytes)
            tensors[fqn] = TensorRef(fqn, entry.properties.dtype, shape, head.file, head.offset,
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
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_metadata(folder)
    where = {k.fqn: v for k, v in metadata.storage_data.items()}
    found = []
    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, BytesStorageMetadata) or _training_state(fqn) or fqn not in where:
            continue
        info = where[fqn]
        try:
            with (folder / str(info.relative_path)).open("rb") as f:
                f.seek(int(info.offset))
                data = f.read(int(info.length))
        except OSError as e:
            raise CorruptCheckpointError(f"{folder}: cannot read entry {fqn!r} ({e})") from None
        if len(data) != int(info.length):
            raise CorruptCheckpointError(f"{folder / str(info.relative_path)}: truncated (entry {fqn!r})")
        found.append((fqn, data))
    return found
