"""`torch.save` archives (`.bin`, `.pt`, `.ckpt` files and DCP's records): where each tensor's bytes are,
found without loading the archive.

Since torch 1.6 an archive is a zip: a pickle (`data.pkl`) of the saved object, whose tensors point at
storages, each stored as an uncompressed member `data/<key>`. So a tensor's bytes are a plain byte range of
the file: found from the zip directory and the pickle, then read, hashed and cached like a safetensors
tensor's. The pickle is input from elsewhere. It is read by an unpickler that builds tensors as records
of where their bytes are, plain containers as themselves, and every other class as an inert stand-in
that is never imported and runs nothing: a Lightning checkpoint's hyper-parameters or nanoGPT's config
need no code of theirs to be skipped, and no code of theirs can run. DCP records, which hold one tensor
each, are read strictly: any other class is refused.

Which entry of the saved object is the model is the trainer's convention (`TRAINER_KEYS`): a plain
state dict (`.bin`), Lightning's `state_dict`, nanoGPT's `model` (names as its own loader gives them,
less `torch.compile`'s `_orig_mod.`), DeepSpeed's `module`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CkptavgWarning, CorruptCheckpointError, InputError, UnsafeCheckpointError, with_path
from ..storage.paths import RemotePath
from .index import TensorRef


@dataclasses.dataclass(frozen=True)
class Storage:
    dtype: torch.dtype
    key: str


@dataclasses.dataclass(frozen=True)
class Rebuilt:
    """A tensor as the pickle describes it: which storage, from which element, in what shape."""

    storage: Storage
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def contiguous(self) -> bool:
        dense = tuple(math.prod(self.size[i + 1:]) for i in range(len(self.size)))
        return all(st == c for st, c, d in zip(self.stride, dense, self.size, strict=True) if d > 1)


class Inert:
    """Stands in for a class outside the allow-list: keeps what the pickle gives it, runs nothing."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass's items (Lightning's AttributeDict)
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:  # a list subclass's
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"<{self.qualname}, not loaded>"


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return Rebuilt(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_):  # nn.Parameter(data, requires_grad, hooks[, state]): the data is the tensor
    return data


def _rebuild_from_type(func, _type, args, _state):  # a tensor subclass: the tensor it wraps
    return func(*args)


_TORCH_REBUILDS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                   ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                   ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
                   ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type}
_CONTAINERS = {("collections", "OrderedDict"): collections.OrderedDict, ("torch", "Size"): tuple,
               ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
               ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray}


def _storage_type(module: str, name: str):
    if module == "torch" and name.endswith("Storage"):
        with warnings.catch_warnings():  # (torch's typed storages are deprecated, and still what it pickles)
            warnings.simplefilter("ignore")
            storage = getattr(torch, name, None)
            if isinstance(getattr(storage, "dtype", None), torch.dtype):
                return storage
    return None


class _Unpickler(pickle.Unpickler):
    """Reads an archive's `data.pkl` into `Rebuilt` records for its tensors (`strict`: tensors and plain
    containers only; otherwise `Inert` stand-ins for every other class)."""

    def __init__(self, data: bytes, strict: bool, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self.strict, self.where = strict, where

    def find_class(self, module: str, name: str):
        found = _TORCH_REBUILDS.get((module, name)) or _CONTAINERS.get((module, name)) or _storage_type(module, name)
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 pickles bytes
            return lambda text, encoding="latin1": text.encode(encoding)
        if self.strict:
            raise UnsafeCheckpointError(f"{self.where}: refusing to unpickle {module}.{name} (only tensors expected)")
        return type(name, (Inert,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self.where}: unexpected persistent id {pid!r}")
        dtype = getattr(pid[1], "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(f"{self.where}: a storage of unknown type {pid[1]!r}")
        return Storage(dtype, str(pid[2]))


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
    """Where the bytes of an uncompressed zip member start in the open file `f`, for a zip that starts at
    `base`: past its local header, whose own name and extra lengths decide; None for a compressed member
    or a header that is not one."""
    if member.compress_type != zipfile.ZIP_STORED:
        return None
    f.seek(base + member.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return base + member.header_offset + 30 + name_len + extra_len


@dataclasses.dataclass(frozen=True)
class Archive:
    """One `torch.save` archive, read: the saved object (tensors as `Rebuilt`), and where each storage's
    bytes start in the file, with their length."""

    obj: Any
    storages: dict[str, tuple[int, int] | None]  # key -> (absolute offset, bytes); None: compressed

    def locate(self, t: Rebuilt, what: str) -> int | None:
        """The absolute byte offset of a contiguous tensor's elements; None where they are not one plain
        range (a strided view, a compressed member)."""
        where = self.storages.get(t.storage.key, ...)
        if where is ...:
            raise CorruptCheckpointError(f"{what}: its storage {t.storage.key!r} is missing from the archive")
        if where is None or not t.contiguous:
            return None
        at = where[0] + t.storage_offset * t.storage.dtype.itemsize
        if t.storage_offset < 0 or at + math.prod(t.size) * t.storage.dtype.itemsize > where[0] + where[1]:
            raise CorruptCheckpointError(f"{what}: its bytes lie outside its storage")
        return at


def is_archive(file: Path) -> bool:
    with file.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def read_archive(f, where: str, base: int = 0, length: int | None = None, strict: bool = False) -> Archive:
    """The archive at `base` of the open file `f` (the whole file by default)."""
    size = f.seek(0, 2)
    length = size - base if length is None else length
    if size < base + length:
        raise CorruptCheckpointError(f"{where}: truncated (needs bytes up to {base + length}, has {size})")
    try:
        with zipfile.ZipFile(_Slice(f, base, length)) as z:
            members = {i.filename.split("/", 1)[-1]: i for i in z.infolist()}
            if "data.pkl" not in members:
                raise CorruptCheckpointError(f"{where}: not a torch.save archive (no data.pkl)")
            data = z.read(members["data.pkl"])
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CorruptCheckpointError(f"{where}: truncated or corrupt torch.save archive ({e})") from None
    try:
        obj = _Unpickler(data, strict, where).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CorruptCheckpointError(f"{where}: its pickle does not parse ({type(e).__name__}: {e})") from None
    storages: dict[str, tuple[int, int] | None] = {}
    for name, member in members.items():
        if name.startswith("data/"):
            at = member_data_offset(f, member, base)
            storages[name[len("data/"):]] = None if at is None else (at, member.file_size)
    return Archive(obj, storages)


# the entry of a trainer's checkpoint that holds the model, told apart by an entry only that trainer saves
TRAINER_KEYS = (("lightning", "state_dict", "pytorch-lightning_version"), ("nanogpt", "model", "model_args"),
                ("deepspeed", "module", "ds_version"))
COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before every name of a compiled module


def model_entries(obj: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(trainer, the model's state dict) of a saved object: a plain state dict (trainer "torch"), or the
    model entry of a Lightning, nanoGPT or DeepSpeed checkpoint. Non-tensor entries are left out."""
    trainer, sd = "torch", obj
    if isinstance(obj, dict):
        for name, key, marker in TRAINER_KEYS:
            if marker in obj and isinstance(obj.get(key), dict):
                trainer, sd = name, obj[key]
                break
        else:
            if isinstance(obj.get("state_dict"), dict):  # a plain {"state_dict": ...} wrapper
                sd = obj["state_dict"]
    inert = next((v for v in (sd, *(sd.values() if isinstance(sd, dict) else ())) if isinstance(v, Inert)), None)
    if inert is not None:  # where weights should be, an object of some class: refused, as weights_only would
        raise UnsafeCheckpointError(f"{where}: refusing to unpickle {inert.qualname}: its state dict should hold "
                                    f"tensors")
    if not isinstance(sd, dict):
        raise InputError(f"{where}: not a state dict (a saved {type(sd).__name__})")
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, (Rebuilt, torch.Tensor))}
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
        refs[name] = TensorRef(name, t.storage.dtype, t.size, file, archive.locate(t, f"{file}: tensor {name!r}"))
    return trainer, refs


def zero3_refused(where: Path) -> InputError:
    """What ckptavg says of a DeepSpeed ZeRO-3 save, found by its folder or by one of its files."""
    return InputError(f"{where}: a DeepSpeed ZeRO-3 checkpoint, whose weights are partitioned across its ranks' "
                      f"files: consolidate it first with the zero_to_fp32.py script DeepSpeed saved beside it")


def _refuse_zero3(file: Path, entries: dict[str, Any]) -> None:
    """ZeRO-3 partitions every parameter across ranks and keeps only placeholders in `module`."""
    if file.name.startswith("zero_pp_rank_") or any(not math.prod(t.size) for t in entries.values()):
        raise zero3_refused(file)


def _index_legacy(file: Path) -> tuple[str, dict[str, TensorRef]]:
    trainer, sd = model_entries(load_whole(file), str(file))
    return trainer, {k: TensorRef(k, v.dtype, tuple(v.shape), file, None) for k, v in sd.items()}


def load_whole(file: Path) -> Any:
    """The saved object, loaded by torch with `weights_only=True` (zip archives mapped, so their tensors
    cost no anonymous memory; legacy ones loaded whole, saying so)."""
    zipped = is_archive(file)
    try:
        obj = torch.load(file, map_location="cpu", mmap=zipped, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{file}: refusing to unpickle: it needs more than weights_only=True allows ({first})"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CorruptCheckpointError(f"{file}: cannot load ({str(e).splitlines()[0]})") from None
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
