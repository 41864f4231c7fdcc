"""`torch.save` archives (`.bin`, `.pt`, `.ckpt` files and DCP's records): where each tensor's bytes are,
found without loading the archive.

Since torch 1.6 an archive is a zip: a pickle (`data.pkl`) of the saved object, whose tensors point at
storages, each stored as an uncompressed member `data/<key>`. So a tensor's bytes are a plain byte range of
the file: found from the zip directory and the pickle, then read, hashed and cached like a safetensors
tensor's.

The archive is input from elsewhere, and is read as torch reads it or refused. The zip: one archive
folder, no name twice (torch would read the first, zipfile the last), no encrypted member, every storage
stored uncompressed and lying inside the archive, its local header agreeing with the directory, a
little-endian `byteorder` (or none, which torch reads as little). The pickle: read into records by
`pickles.py`, which executes nothing, and then by this module's schema: a tensor is a `Rebuilt`
record (which storage, from which element, in what shape), every other object stays a `Call` record of
what it asked for. A Lightning checkpoint's hyper-parameters or nanoGPT's config need no code of theirs
to be skipped, and no code of theirs can run. DCP records, which hold one tensor each, are read
strictly: any other class is refused.

Which entry of the saved object is the model is the trainer's convention (`TRAINER_KEYS`): a plain
state dict (`.bin`), Lightning's `state_dict`, nanoGPT's `model` (names as its own loader gives them,
less `torch.compile`'s `_orig_mod.`), DeepSpeed's `module`.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import struct
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CkptavgWarning, CorruptCheckpointError, InputError, UnsafeCheckpointError, with_path
from ..storage.paths import RemotePath
from .index import Checkpoint, TensorRef
from .names import DEEPSPEED_MODEL, NANOGPT_CHECKPOINT, TORCH_SAVE_SUFFIXES
from .outputs import Format, OutputFile, OutputLayout, Spec, fake, saved_without_data, spec_nbytes
from .pickles import Call, Name, read_pickle, read_pickle_at, walk

# The opcodes torch's own loader of these files (`weights_only`) reads: a pickle that uses another is one torch
# refuses, and so is refused here too.
TORCH_OPCODES = frozenset({
    "PROTO", "STOP", "MARK", "GLOBAL", "REDUCE", "NEWOBJ", "BUILD", "BINPERSID", "NONE", "NEWTRUE", "NEWFALSE",
    "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "EMPTY_TUPLE", "TUPLE",
    "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "APPEND", "APPENDS", "EMPTY_DICT", "SETITEM", "SETITEMS",
    "EMPTY_SET", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT",
})
# the largest `data.pkl` read (a state dict's pickle is about 100 bytes a tensor: 10**6 tensors fit), which
# bounds the time its reading takes too (about 10 MB/s here)
MAX_PICKLE_BYTES = 256 << 20
# dtypes by the names a pickle gives them: `torch.float16` (a `Name`), `torch.HalfStorage` (a storage type)
DTYPES: dict[str, torch.dtype] = {n: v for n in dir(torch) if isinstance(v := getattr(torch, n), torch.dtype)}
STORAGE_DTYPES: dict[str, torch.dtype] = {n: d for d, n in torch.storage._dtype_to_storage_type_map().items()}
_REBUILD_V2, _REBUILD_V3 = Name("torch._utils", "_rebuild_tensor_v2"), Name("torch._utils", "_rebuild_tensor_v3")
_PARAMETERS = (Name("torch._utils", "_rebuild_parameter"), Name("torch._utils", "_rebuild_parameter_with_state"))
_FROM_TYPE = Name("torch._tensor", "_rebuild_from_type_v2")
_ORDERED_DICT = Name("collections", "OrderedDict")
_TENSOR_TYPES = (Name("torch", "Tensor"), Name("torch._tensor", "Tensor"), Name("torch.nn.parameter", "Parameter"))
# What a tensor's record may name: what a DCP record (one tensor) is read with, strictly.
TENSOR_NAMES = frozenset({(n.module, n.name) for n in (_REBUILD_V2, _REBUILD_V3, *_PARAMETERS, _ORDERED_DICT)}
                         | {("torch", n) for n in STORAGE_DTYPES} | {("torch", n) for n in DTYPES}
                         | {("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage")})
# What torch's own `weights_only` loader may be given to call, with the arguments each may take: checked
# before `load_whole` hands it a file, since it calls them as the pickle says (`bytearray(3 * 10**9)`,
# `torch.Tensor(10**9)` are on its list).
_BOUNDED_CALLS = {
    ("collections", "OrderedDict"): lambda args: args == () or isinstance(args[0], list) and len(args) == 1,
    ("torch", "Size"): lambda args: len(args) == 1 and isinstance(args[0], tuple),
    ("_codecs", "encode"): lambda args: len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1",
                                                                                                  "latin-1"),
    ("builtins", "bytearray"): lambda args: args == () or len(args) == 2 and isinstance(args[0], str),
    ("builtins", "set"): lambda args: args == () or len(args) == 1 and isinstance(args[0], list),
    ("torch.serialization", "_get_layout"): lambda args: args in (("torch.strided",), ("torch.sparse_coo",)),
    ("torch", "device"): lambda args: all(isinstance(a, (str, int)) for a in args),
}


@dataclasses.dataclass(frozen=True)
class Storage:
    """A storage as its persistent id describes it: `dtype` None for an untyped one (whose tensor names its
    dtype), `numel` in elements of `dtype` (in bytes when untyped)."""

    dtype: torch.dtype | None
    key: str
    numel: int


@dataclasses.dataclass(frozen=True)
class Rebuilt:
    """A tensor as the pickle describes it: which storage, from which element, in what shape."""

    storage: Storage
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @property
    def contiguous(self) -> bool:
        dense = tuple(math.prod(self.size[i + 1:]) for i in range(len(self.size)))
        return all(st == c for st, c, d in zip(self.stride, dense, self.size, strict=True) if d > 1)


def _ints(value: Any, what: str, where: str) -> tuple[int, ...]:
    """A tuple of non-negative ints (a size, a stride), or a corrupt checkpoint."""
    if isinstance(value, Call) and value.func == Name("torch", "Size") and len(value.args) == 1:
        value = value.args[0]
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and 0 <= v < 1 << 62 for v in value):
        raise CorruptCheckpointError(f"{where}: a tensor's {what} is not a tuple of non-negative integers")
    return tuple(value)


def _storage(pid: Any, where: str) -> Storage:
    """The record of a persistent id: ("storage", storage type, key, location, numel)."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise UnsafeCheckpointError(f"{where}: unexpected persistent id (a {type(pid).__name__})")
    kind, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(kind, Name) or not isinstance(key, str) or type(numel) is not int or not 0 <= numel < 1 << 62:
        raise CorruptCheckpointError(f"{where}: a malformed storage record")
    if kind.module == "torch" and kind.name in STORAGE_DTYPES:
        return Storage(STORAGE_DTYPES[kind.name], key, numel)
    if kind.name == "UntypedStorage" and kind.module in ("torch", "torch.storage"):
        return Storage(None, key, numel)
    raise CorruptCheckpointError(f"{where}: a storage of unknown type {kind}")


def tensor_of(value: Any, where: str) -> Rebuilt | None:
    """The tensor a record describes (a rebuilt tensor, a parameter, a tensor subclass's tensor); None for
    anything else. Every argument is checked as torch's rebuild functions take it: a negative or non-integer
    size, a dtype that disagrees with its storage, a flag that is not a bool, arguments too many or too few,
    are corrupt."""
    for _ in range(3):  # a parameter of a subclass of a tensor, at most
        if not isinstance(value, Call):
            return None
        args = value.args
        if value.func in _PARAMETERS:
            if len(args) != (3 if value.func == _PARAMETERS[0] else 4) or type(args[1]) is not bool \
                    or as_dict(args[2]) is None:
                raise CorruptCheckpointError(f"{where}: a parameter rebuilt with arguments torch does not take")
            value = args[0]
        elif value.func == _FROM_TYPE:
            if len(args) != 4 or not isinstance(args[0], Name) or args[1] not in _TENSOR_TYPES \
                    or not isinstance(args[2], tuple):
                return None
            value = Call(args[0], args[2])
        else:
            break
    if not isinstance(value, Call) or value.func not in (_REBUILD_V2, _REBUILD_V3):
        return None
    args, v3 = value.args, value.func == _REBUILD_V3
    if len(args) not in ((7, 8) if v3 else (6, 7)) or type(args[4]) is not bool or as_dict(args[5]) is None \
            or len(args) == (8 if v3 else 7) and args[-1] is not None and as_dict(args[-1]) is None:
        raise CorruptCheckpointError(f"{where}: a tensor rebuilt with arguments torch does not take")
    storage, offset = args[0], args[1]
    if not isinstance(storage, Storage) or type(offset) is not int or not 0 <= offset < 1 << 62:
        raise CorruptCheckpointError(f"{where}: a tensor with a malformed storage or offset")
    size, stride = _ints(args[2], "size", where), _ints(args[3], "stride", where)
    if len(size) != len(stride):
        raise CorruptCheckpointError(f"{where}: a tensor whose size and stride differ in length")
    dtype = storage.dtype
    if v3:
        named = DTYPES.get(args[6].name) if isinstance(args[6], Name) and args[6].module == "torch" else None
        if named is None or dtype not in (None, named):
            raise CorruptCheckpointError(f"{where}: a tensor whose dtype is missing or disagrees with its storage")
        if dtype is None:  # an untyped storage counts bytes
            if storage.numel % named.itemsize:
                raise CorruptCheckpointError(f"{where}: a storage of {storage.numel} bytes for {named} elements")
            storage = Storage(named, storage.key, storage.numel // named.itemsize)
        dtype = named
    if dtype is None:
        raise CorruptCheckpointError(f"{where}: a tensor of an untyped storage without a dtype")
    if math.prod(size):  # every element it views lies in its storage
        last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise CorruptCheckpointError(f"{where}: a tensor whose elements lie outside its storage")
    return Rebuilt(storage, offset, size, stride, dtype)


def as_dict(value: Any) -> dict | None:
    """A dict, or an `OrderedDict` record as the dict it holds; None for anything else."""
    if isinstance(value, dict):
        return value
    if isinstance(value, Call) and value.func == _ORDERED_DICT and not value.values and (
            value.state is None or isinstance(value.state, dict)):  # (its attributes, such as a state dict's _metadata)
        if not value.args:
            return value.items
        if len(value.args) == 1 and isinstance(value.args[0], list) and not value.items \
                and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in value.args[0]):
            try:
                return dict(value.args[0])
            except TypeError:
                return None
    return None


def _check_loadable(obj: Any, where: str) -> None:
    """Refuse a pickle that asks torch's `weights_only` loader for a call that allocates on its say-so, or for
    an object this module does not know (which that loader refuses too, less clearly)."""
    for value in walk(obj):
        if isinstance(value, Call):
            key = (value.func.module, value.func.name)
            if key in _BOUNDED_CALLS:
                if not _BOUNDED_CALLS[key](value.args):
                    raise UnsafeCheckpointError(f"{where}: refusing to load a call of {value.func} with arguments "
                                                f"it does not take in a checkpoint")
            elif tensor_of(value, where) is None and value.func not in (_REBUILD_V2, _REBUILD_V3, *_PARAMETERS,
                                                                         _FROM_TYPE):
                raise UnsafeCheckpointError(f"{where}: refusing to unpickle {value.func}: not a tensor or a plain "
                                            f"container")


class _Slice(io.RawIOBase):
    """A read-only window [start, start + length) of a file, for zipfile to read one archive's directory."""

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
    """Where the bytes of a zip member start in the open file `f`, for a zip that starts at `base`: past
    its local header, whose own name and extra lengths decide (as torch's reader takes them); None for a
    local header that is not one or disagrees with the directory (another name, another compression)."""
    f.seek(base + member.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        return None
    flags, method = struct.unpack("<HH", local[6:10])
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    name = f.read(name_len)
    named = member.orig_filename.encode("utf-8" if member.flag_bits & 0x800 else "cp437", "replace")
    if flags & 0x2061 or method != member.compress_type or name != named:
        return None
    return base + member.header_offset + 30 + name_len + extra_len


@dataclasses.dataclass(frozen=True)
class Archive:
    """One `torch.save` archive, read: the saved object (tensors as `Rebuilt` records), and where each
    storage's bytes lie in the file, with their length."""

    obj: Any
    storages: dict[str, tuple[int, int]]  # key -> (absolute offset, bytes)

    def locate(self, t: Rebuilt, what: str) -> int | None:
        """The absolute byte offset of a contiguous tensor's elements; None where they are not one plain
        range (a strided view)."""
        where = self.storages.get(t.storage.key)
        if where is None:
            raise CorruptCheckpointError(f"{what}: its storage {t.storage.key!r} is missing from the archive")
        if where[1] != t.storage.numel * t.dtype.itemsize:
            raise CorruptCheckpointError(f"{what}: its storage holds {where[1]} bytes, its record says "
                                         f"{t.storage.numel} {str(t.dtype).removeprefix('torch.')} elements")
        if not t.contiguous:
            return None
        return where[0] + t.storage_offset * t.dtype.itemsize


def is_archive(file: Path) -> bool:
    with file.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


# what zipfile raises for a directory it cannot parse (a lying ZIP64 record, an unknown compression)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError, OverflowError,
               struct.error, UnicodeDecodeError, KeyError, IndexError, RuntimeError)


def _members(z: zipfile.ZipFile, f, where: str, base: int, length: int) -> dict[str, tuple[zipfile.ZipInfo, int]]:
    """Each member of the archive by its name within the archive's one folder, with where its data starts:
    every check on the zip's structure, before anything in it is read."""
    members: dict[str, tuple[zipfile.ZipInfo, int]] = {}
    folder = None
    for info in z.infolist():
        top, _, name = info.filename.partition("/")
        folder = top if folder is None else folder
        if top != folder or not name:
            raise CorruptCheckpointError(f"{where}: a torch.save archive with members outside its one folder "
                                         f"({info.filename!r})")
        if name in members:
            raise CorruptCheckpointError(f"{where}: two members named {info.filename!r} (torch would read one, "
                                         f"zipfile another)")
        if info.flag_bits & 0x2061:  # encrypted, strongly encrypted, a patch, a masked header: torch refuses them
            raise UnsafeCheckpointError(f"{where}: an encrypted or patched member {info.filename!r}")
        if info.volume:
            raise CorruptCheckpointError(f"{where}: member {info.filename!r} is said to be on another disk")
        if info.external_attr & 0x10:  # (torch's reader takes such a member for a folder, and reads other bytes)
            raise CorruptCheckpointError(f"{where}: member {info.filename!r} is marked as a folder")
        at = member_data_offset(f, info, base) if 0 <= info.header_offset < length else None
        if at is None or at + info.compress_size > base + length:
            raise CorruptCheckpointError(f"{where}: member {info.filename!r} has a bad local header or lies "
                                         f"outside the archive")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpointError(f"{where}: member {info.filename!r} is compressed (torch.save stores "
                                         f"every record uncompressed, and its storages are read in place)")
        if info.file_size != info.compress_size:
            raise CorruptCheckpointError(f"{where}: member {info.filename!r} is stored with two sizes")
        members[name] = (info, at)
    return members


def _check_end_record(f, where: str, base: int, length: int, count: int) -> None:
    """Refuse what zipfile reads and torch's reader does not: a directory said to span several disks, or
    bytes before the archive or between its directory and its end record (zipfile shifts every offset past
    them; torch reads none of it), or a count of members other than the directory holds (`count`, which
    zipfile reads by the directory's size and torch by that count)."""
    tail = min(length, 22 + 0xFFFF)
    f.seek(base + length - tail)
    data = f.read(tail)
    at = data.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(data):
        return  # (zipfile says what is wrong)
    disk, cd_disk, on_disk, total, cd_size, cd_offset = struct.unpack("<HHHHII", data[at + 4:at + 20])
    several = disk or cd_disk or on_disk != total
    end = length - len(data) + at  # where the end record is, in the archive
    locator = at - 20  # a ZIP64 end record's locator, just before: the disk that holds it, how many disks
    if locator >= 0 and data[locator:locator + 4] == b"PK\x06\x07":
        z64_disk, _, disks = struct.unpack("<IQI", data[locator + 4:locator + 20])
        several = several or z64_disk or disks > 1
        start = locator - 56
        if start >= 0 and data[start:start + 4] == b"PK\x06\x06":
            disk, cd_disk, on_disk, total, cd_size, cd_offset = struct.unpack("<IIQQQQ", data[start + 16:start + 56])
            several = several or disk or cd_disk or on_disk != total
            end = length - len(data) + start
    if several:
        raise CorruptCheckpointError(f"{where}: a zip said to span several disks")
    if total != count:
        raise CorruptCheckpointError(f"{where}: its end record counts {total} members, its directory holds {count}")
    if cd_offset + cd_size != end:
        raise CorruptCheckpointError(f"{where}: bytes before the archive or after its directory (torch reads an "
                                     f"archive that starts at its first byte)")


# the small records torch reads and parses, each as torch takes it
_SMALL_RECORDS = {"version": int, ".data/version": int, ".format_version": int, ".storage_alignment": int,
                  ".data/serialization_id": lambda raw: raw.decode("utf-8")}


def _member(f, members: dict, name: str) -> bytes:
    """A member's bytes, read where its local header says (every member is stored: `_members`); like
    torch's reader, no CRC-32 is checked."""
    info, at = members[name]
    f.seek(at)
    return f.read(info.file_size)


def _small_records(f, members: dict, where: str) -> None:
    """Refuse an archive whose version, alignment or serialization id torch could not parse."""
    for name, parse in _SMALL_RECORDS.items():
        if name in members:
            try:
                if members[name][0].file_size > 64:
                    raise ValueError
                parse(_member(f, members, name))
            except (ValueError, UnicodeDecodeError):
                raise CorruptCheckpointError(f"{where}: its {name} record is not what torch reads") from None


def _byteorder(f, members: dict, where: str) -> None:
    """Refuse an archive saved big-endian (torch would swap its bytes; ckptavg reads them in place). No
    record is little-endian, as torch reads it."""
    if "byteorder" not in members:
        return
    order = _member(f, members, "byteorder") if members["byteorder"][0].file_size <= 16 else b""
    if order == b"big":
        raise CorruptCheckpointError(f"{where}: a big-endian archive (byteorder 'big'): ckptavg reads "
                                     f"little-endian ones only")
    if order != b"little":
        raise CorruptCheckpointError(f"{where}: an unknown byteorder record")


def read_archive(f, where: str, base: int = 0, length: int | None = None, strict: bool = False) -> Archive:
    """The archive at `base` of the open file `f` (the whole file by default). `strict`: a record that
    holds one tensor and nothing else (DCP's)."""
    size = f.seek(0, 2)
    length = size - base if length is None else length
    if length < 0 or base < 0 or size < base + length:
        raise CorruptCheckpointError(f"{where}: truncated (needs bytes up to {base + length}, has {size})")
    try:
        with zipfile.ZipFile(_Slice(f, base, length)) as z:
            members = _members(z, f, where, base, length)
            _check_end_record(f, where, base, length, len(z.infolist()))
            if "data.pkl" not in members:
                raise CorruptCheckpointError(f"{where}: not a torch.save archive (no data.pkl)")
            if "version" not in members and ".data/version" not in members:
                raise CorruptCheckpointError(f"{where}: not a torch.save archive (no version record, which torch "
                                             f"requires)")
            _byteorder(f, members, where)
            _small_records(f, members, where)
            info = members["data.pkl"][0]
            if info.file_size > MAX_PICKLE_BYTES:
                raise CorruptCheckpointError(f"{where}: its pickle is {info.file_size} bytes, more than ckptavg "
                                             f"reads ({MAX_PICKLE_BYTES})")
            data = _member(f, members, "data.pkl")
    except _ZIP_ERRORS as e:
        raise CorruptCheckpointError(f"{where}: truncated or corrupt torch.save archive ({e})") from None
    obj = read_pickle(data, where, names=TENSOR_NAMES if strict else None,
                      persistent=lambda pid: _storage(pid, where), opcodes=TORCH_OPCODES)
    storages = {name[len("data/"):]: (at, info.file_size) for name, (info, at) in members.items()
                if name.startswith("data/")}
    return Archive(obj, storages)


# the entry of a trainer's checkpoint that holds the model, told apart by an entry only that trainer saves
TRAINER_KEYS = (("lightning", "state_dict", "pytorch-lightning_version"), ("nanogpt", "model", "model_args"),
                ("deepspeed", "module", "ds_version"))
COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before every name of a compiled module
# the file a trainer's torch.save output is called, by trainer
TORCH_SAVE_FILES = {"lightning": "model.ckpt", "nanogpt": NANOGPT_CHECKPOINT, "deepspeed": DEEPSPEED_MODEL}


def model_entries(obj: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(trainer, the model's state dict) of a saved object, read into records (tensors as `Rebuilt`) or
    loaded by torch (tensors as tensors): a plain state dict (trainer "torch"), or the model entry of a
    Lightning, nanoGPT or DeepSpeed checkpoint. Non-tensor entries are left out."""
    trainer, sd = "torch", as_dict(obj)
    if sd is not None:
        for name, key, marker in TRAINER_KEYS:
            if marker in sd and as_dict(sd.get(key)) is not None:
                trainer, sd = name, as_dict(sd[key])
                break
        else:
            if as_dict(sd.get("state_dict")) is not None:  # a plain {"state_dict": ...} wrapper
                sd = as_dict(sd["state_dict"])
    if sd is None:
        what = obj.func if isinstance(obj, Call) else type(obj).__name__
        raise InputError(f"{where}: not a state dict (a saved {what})")
    tensors: dict[str, Any] = {}
    for key, value in sd.items():
        t = value if isinstance(value, torch.Tensor) else tensor_of(value, f"{where}: entry {key!r}"[:500])
        if t is None:
            if isinstance(value, Call) and tensor_of(value, where) is None and as_dict(value) is None:
                # where weights should be, an object of some class: refused, as weights_only would
                raise UnsafeCheckpointError(f"{where}: refusing to unpickle {value.func}: its state dict should "
                                            f"hold tensors")
            continue
        if not isinstance(key, str):
            raise CorruptCheckpointError(f"{where}: a tensor whose name is a {type(key).__name__}, not a string")
        tensors[key] = t
    if trainer == "nanogpt":
        tensors = {k.removeprefix(COMPILED_PREFIX): v for k, v in tensors.items()}
    return trainer, tensors


def index_file(file: Path) -> tuple[str, dict[str, TensorRef]]:
    """(trainer, each model tensor with its byte offset): a tensor without one (a strided view, a legacy
    pre-1.6 file) has offset None and is copied out of `load_state_dict`'s mapping instead."""
    try:
        if not is_archive(file):
            return _index_legacy(file)
        with file.open("rb") as f:
            archive = read_archive(f, str(file))
    except OSError as e:
        raise with_path(e, file) from None
    trainer, entries = model_entries(archive.obj, str(file))
    if trainer == "deepspeed":
        _refuse_zero3(file, entries)
    refs = {}
    for name, t in entries.items():
        at = archive.locate(t, f"{file}: tensor {name!r}")
        if at is None:  # (copied out of torch's own loading of the file, which must then be safe to ask for)
            _check_loadable(archive.obj, str(file))
        refs[name] = TensorRef(name, t.dtype, t.size, file, at)
    return trainer, refs


def zero3_refused(where: Path) -> InputError:
    """What ckptavg says of a DeepSpeed ZeRO-3 save, found by its folder or by one of its files."""
    return InputError(f"{where}: a DeepSpeed ZeRO-3 checkpoint, whose weights are partitioned across its ranks' "
                      f"files: consolidate it first with the zero_to_fp32.py script DeepSpeed saved beside it")


def _refuse_zero3(file: Path, entries: dict[str, Any]) -> None:
    """ZeRO-3 partitions every parameter across ranks and keeps only placeholders in `module`."""
    if file.name.startswith("zero_pp_rank_") or entries and not any(math.prod(t.size) for t in entries.values()):
        raise zero3_refused(file)


def _index_legacy(file: Path) -> tuple[str, dict[str, TensorRef]]:
    trainer, sd = model_entries(load_whole(file), str(file))
    return trainer, {k: TensorRef(k, v.dtype, tuple(v.shape), file, None) for k, v in sd.items()}


LEGACY_HEAD_BYTES = 64 << 20  # a legacy file's pickles come before its storages' bytes, in this much
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save file


def _legacy_object(file: Path) -> Any:
    """The saved object of a legacy (pre-1.6, non-zip) file, read into records: its fourth pickle, after a
    magic number, a protocol version and a description of the saving system."""
    with file.open("rb") as f:
        head = f.read(LEGACY_HEAD_BYTES)
    magic, at = read_pickle_at(head, 0, str(file))  # (any pickle, to say plainly when it is no torch.save file)
    if magic != LEGACY_MAGIC:
        raise CorruptCheckpointError(f"{file}: not a torch.save file (neither a zip archive nor a legacy one)")
    obj = None
    for _ in range(3):
        obj, at = read_pickle_at(head, at, str(file), persistent=lambda pid: _legacy_storage(pid, str(file)),
                                 opcodes=TORCH_OPCODES)
    return obj


def _legacy_storage(pid: Any, where: str) -> Storage:
    """A legacy file's persistent id: ("storage", storage type, key, location, numel, view metadata)."""
    if isinstance(pid, tuple) and len(pid) == 6:
        return _storage(pid[:5], where)
    raise CorruptCheckpointError(f"{where}: a malformed storage record")


def load_whole(file: Path) -> Any:
    """The saved object, loaded by torch with `weights_only=True` (zip archives mapped, so their tensors
    cost no anonymous memory; legacy ones loaded whole, saying so), once its pickle has been read into
    records and found to ask torch for nothing that allocates on its say-so."""
    try:
        zipped = is_archive(file)
        if zipped:
            with file.open("rb") as f:
                obj = read_archive(f, str(file)).obj
        else:
            obj = _legacy_object(file)
    except OSError as e:
        raise with_path(e, file) from None
    _check_loadable(obj, str(file))
    try:
        obj = torch.load(file, map_location="cpu", mmap=zipped, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{file}: refusing to unpickle: it needs more than weights_only=True allows ({first})"
        ) from None
    except OSError as e:
        raise with_path(e, file) from None
    except Exception as e:  # (torch's loader fails on bad input in many ways: RuntimeError, IndexError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CorruptCheckpointError(f"{file}: torch cannot load it ({type(e).__name__}: {first[:200]})") from None
    if not zipped:
        warnings.warn(f"{file} is a legacy (non-zip) checkpoint: it was loaded whole into memory", CkptavgWarning,
                      stacklevel=2)
    return obj


def load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a file as torch loads them, named as `index_file` names them: for the tensors
    that have no byte range of their own."""
    return model_entries(load_whole(file), str(file))[1]


def saved_object(file: Path | RemotePath, trainer: str) -> tuple[dict, str]:
    """A trainer's saved object as torch loads it (`weights_only`, tensors mapped and never read) and the
    key of its model entry: what an output in the trainer's own format is made from. On an object store
    the file is staged to a local temporary file first (torch maps only local files)."""
    key = next((k for name, k, _ in TRAINER_KEYS if name == trainer), None)
    if isinstance(file, RemotePath):  # torch.load maps local files only: the newest one is staged, then mapped
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=file.suffix) as staged:
            file.storage.fs.get_file(file.path, staged.name)
            return saved_object(Path(staged.name), trainer)  # (the mapping outlives the name)
    obj = load_whole(file)
    if key is None or not isinstance(obj, dict) or not isinstance(obj.get(key), dict):
        raise InputError(f"{file}: not a {trainer} checkpoint ckptavg can write again")
    return obj, key


def _holds_tensors(obj: object) -> bool:
    """Whether a loaded entry holds a tensor at any depth (walked without recursion: a checkpoint's
    hyper-parameters nest as deep as its pickle allows)."""
    seen, todo = set(), [obj]
    while todo:
        value = todo.pop()
        if isinstance(value, torch.Tensor):
            return True
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            todo.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            todo.extend(value)
    return False


def torch_save_layout(saved: dict, model_key: str, specs: Sequence[Spec], filename: str) -> OutputLayout:
    """`saved` (the newest input's object, as torch loads it) with `saved[model_key]` holding `specs`, its
    other entries that hold tensors left out, as one `torch.save` file whose tensors' bytes are holes."""
    obj = {k: v for k, v in saved.items() if k == model_key or not _holds_tensors(v)}
    obj[model_key] = {s[0]: fake(s) for s in specs}
    try:
        file = saved_without_data(obj)
    except RecursionError:  # (hyper-parameters that torch loads but pickle cannot write back, nested so deep)
        raise InputError(f"{filename}: the newest input's entries beside the model nest too deep to be saved "
                         f"again; write the average as safetensors (--output-format safetensors)") from None
    file.seek(0)
    archive = read_archive(file, filename)
    model = as_dict(as_dict(archive.obj)[model_key])
    parts, holes = file.split()
    where = {at: i for i, (at, _) in enumerate(holes)}
    order: list[str | None] = [None] * len(holes)
    empty = []
    for s in specs:
        t = tensor_of(model[s[0]], s[0])
        at = archive.locate(t, s[0])
        if not spec_nbytes(s):
            empty.append(s[0])
        elif at not in where or holes[where[at]][1] != spec_nbytes(s) or order[where[at]] is not None:
            raise RuntimeError(f"torch.save did not leave {s[0]!r} a range of its own: not a file ckptavg can frame")
        else:
            order[where[at]] = s[0]
    if None in order:
        raise RuntimeError("torch.save left a range unwritten that holds no tensor")
    return OutputLayout("torch", (OutputFile(filename, (*order, *empty), (*parts, *(b"" for _ in empty))),))


def _torch_source(newest: Checkpoint) -> tuple[dict, str]:
    return saved_object(newest.files[0], newest.trainer)


FORMAT = Format("bin", "torch",
                lambda specs, shard_bytes, newest: torch_save_layout(*newest.source, specs,
                                                                     TORCH_SAVE_FILES[newest.trainer]),
                index_file, TORCH_SAVE_SUFFIXES, _torch_source, shards=False)
