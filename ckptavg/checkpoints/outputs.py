"""How an output checkpoint's files are laid out, in each format ckptavg writes, from names, dtypes and
shapes alone: so that the engine streams every tensor's bytes straight into place, knowing no format.

A file is written front to back as `frames[0]`, the first tensor's bytes, `frames[1]`, the second's, ...,
`frames[-1]`: the bytes between the tensors depend only on the plan. Small files that describe the
others (a safetensors index, DCP's `.metadata`) are given whole.

- safetensors: a header, then the tensors back to back.
- torch (a trainer's own `torch.save` file: Lightning's `.ckpt`, nanoGPT's `ckpt.pt`, DeepSpeed's
  `mp_rank_00_model_states.pt`): the newest input's saved object with its model entry holding the
  average, and its other entries that hold tensors (optimizer state, a best score) left out, so
  that the trainer's loader takes it as a model (`load_from_checkpoint`, nanoGPT's sample.py,
  DeepSpeed's `load_module_only`), not as a run to resume. Framed like DCP's records.
- DCP: one `__0_0.distcp` of `torch.save` records, one per tensor (one chunk each, as a single-process
  `dcp.save` would write them), and a `.metadata` that torch's own reader and the trainers' loaders
  read. Each record is framed by `torch.save` itself, told to skip the tensor's bytes
  (`torch.serialization.skip_data`, on a fake tensor that owns no memory), which leaves the space the
  engine fills. As with `torch.serialization.set_crc32_options(False)`, the records carry no CRC-32 of
  their data (torch's reader checks none), so no pass over the bytes is spent on one.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError
from .index import DTYPE_NAMES, Checkpoint
from .names import (
    DCP_SIDE_FILES,
    DCP_SUBFOLDER_OF,
    DEEPSPEED_MODEL,
    NANOGPT_CHECKPOINT,
    SAFETENSORS_INDEX,
    SIDE_FILES,
)

DCP_FILE = "__0_0.distcp"
OUTPUT_FORMATS = ("safetensors", "dcp", "torch")
AUTO = "auto"  # the inputs' own format where ckptavg writes it (DCP, a trainer's torch.save file), else safetensors
# the file a trainer's torch.save output is called, by trainer
TORCH_SAVE_FILES = {"lightning": "model.ckpt", "nanogpt": NANOGPT_CHECKPOINT, "deepspeed": DEEPSPEED_MODEL}

Spec = tuple[str, torch.dtype, tuple[int, ...]]  # a tensor's name, dtype and shape


def resolve_format(asked: str, input_formats: Sequence[str], trainer: str) -> str:
    """The output format for inputs of `input_formats` saved by `trainer`: `asked`, or for "auto" the
    inputs' own where ckptavg writes it (an average of DCP checkpoints is a DCP checkpoint, of Lightning
    checkpoints a `.ckpt`), else safetensors."""
    if asked == AUTO:
        if input_formats and all(f == "dcp" for f in input_formats):
            return "dcp"
        return "torch" if trainer in TORCH_SAVE_FILES else "safetensors"
    if asked not in OUTPUT_FORMATS:
        raise ValueError(f"output format {asked!r} is not one of {(AUTO, *OUTPUT_FORMATS)}")
    if asked == "torch" and (trainer not in TORCH_SAVE_FILES or "dcp" in input_formats):
        raise InputError(f"--output-format torch writes a trainer's own file ({', '.join(TORCH_SAVE_FILES)}); "
                         f"these inputs were saved by {trainer}")
    return asked


@dataclass(frozen=True)
class OutputFile:
    filename: str
    names: tuple[str, ...]  # the tensors in the order their bytes are written
    frames: tuple[bytes, ...]  # len(names) + 1: before the first tensor, between each two, after the last


@dataclass(frozen=True)
class OutputLayout:
    format: str
    files: tuple[OutputFile, ...]
    extra: tuple[tuple[str, bytes], ...] = ()  # small files written whole, after the others

    @property
    def nbytes(self) -> int:
        return sum(len(f) for o in self.files for f in o.frames) + sum(len(b) for _, b in self.extra)


def _nbytes(spec: Spec) -> int:
    n = spec[1].itemsize
    for d in spec[2]:
        n *= d
    return n


def safetensors_header(specs: Sequence[Spec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header of a file holding `specs` back to back, in order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec[0]] = {"dtype": DTYPE_NAMES[spec[1]], "shape": list(spec[2]),
                           "data_offsets": [offset, offset + _nbytes(spec)]}
        offset += _nbytes(spec)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data section 8-byte aligned
    return (len(raw)).to_bytes(8, "little") + raw


def safetensors_layout(groups: Sequence[Sequence[Spec]]) -> OutputLayout:
    """One file per group (`model.safetensors`, or `model-0000i-of-0000n.safetensors` and an index)."""
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    files = tuple(OutputFile(name, tuple(s[0] for s in g), (safetensors_header(g), *(b"" for _ in g)))
                  for name, g in zip(names, groups, strict=True))
    extra = ()
    if n > 1:
        index = {"metadata": {"total_size": sum(_nbytes(s) for g in groups for s in g)},
                 "weight_map": {s[0]: f.filename for f, g in zip(files, groups, strict=True) for s in g}}
        extra = ((SAFETENSORS_INDEX, (json.dumps(index, indent=2) + "\n").encode()),)
    return OutputLayout("safetensors", files, extra)


class _Holes(io.RawIOBase):
    """A file that keeps what is written to it and where, and holds nothing where it is seeked past:
    `torch.save` with `skip_data` seeks past each storage's bytes."""

    def __init__(self) -> None:
        self.pos, self.size, self.writes = 0, 0, []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        self.writes.append((self.pos, data))
        self.pos += len(data)
        self.size = max(self.size, self.pos)
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        """What was written where it was, zeros where nothing was (for zipfile to read the directory)."""
        n = max(0, min(len(b), self.size - self.pos))
        view = memoryview(b)
        view[:n] = bytes(n)
        for at, data in self.writes:
            lo, hi = max(at, self.pos), min(at + len(data), self.pos + n)
            if lo < hi:
                view[lo - self.pos : hi - self.pos] = data[lo - at : hi - at]
        self.pos += n
        return n

    def split(self) -> tuple[list[bytes], list[tuple[int, int]]]:
        """The bytes written, as the runs between the ranges never written, and those ranges
        ((offset, length), in order): len(ranges) + 1 runs (a later write over an earlier one wins)."""
        holes, pos = [], 0
        for at, data in sorted(self.writes, key=lambda w: w[0]):
            if at > pos:
                holes.append((pos, at - pos))
            pos = max(pos, at + len(data))
        bounds = [0, *(x for at, n in holes for x in (at, at + n)), self.size]
        runs = [(bounds[i], bytearray(bounds[i + 1] - bounds[i])) for i in range(0, len(bounds), 2)]
        for at, data in self.writes:
            start, run = next(r for r in reversed(runs) if r[0] <= at)
            run[at - start : at - start + len(data)] = data
        return [bytes(run) for _, run in runs], holes


def _saved_without_data(obj: object) -> _Holes:
    """`obj` as `torch.save` writes it, with every storage's bytes left out."""
    from torch.serialization import skip_data

    f = _Holes()
    with skip_data(materialize_fake_tensors=True):
        torch.save(obj, f)
    return f


def _fake(spec: Spec) -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(spec[2], dtype=spec[1])


def dcp_layout(specs: Sequence[Spec], subfolder: str = "", raw: Sequence[tuple[str, bytes]] = ()) -> OutputLayout:
    """One `.distcp` file of a record per tensor, then the `raw` entries (name, saved bytes: the model's
    non-tensor entries, `dcp.model_bytes`), and the `.metadata` that says where each lies; in `subfolder`
    of the output where the trainer keeps its DCP folder inside a step's (OLMo-core)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    frames, entries, storage, at = [b""], {}, {}, 0
    for spec in specs:
        saved = _saved_without_data(_fake(spec))
        parts, holes = saved.split()
        if [n for _, n in holes] != ([_nbytes(spec)] if _nbytes(spec) else []):
            raise RuntimeError(f"torch.save left {holes} unwritten for {spec}: not a record ckptavg can frame")
        frames[-1] += parts[0]
        frames.extend(parts[1:] or [b""])  # (an empty tensor: its no bytes go after its record)
        origin = torch.Size([0] * len(spec[2]))
        entries[spec[0]] = TensorStorageMetadata(TensorProperties(dtype=spec[1]), torch.Size(spec[2]),
                                                 [ChunkStorageMetadata(origin, torch.Size(spec[2]))])
        storage[MetadataIndex(spec[0], origin)] = _StorageInfo(DCP_FILE, at, saved.size)
        at += saved.size
    for name, data in raw:
        frames[-1] += data
        entries[name] = BytesStorageMetadata()
        storage[MetadataIndex(name)] = _StorageInfo(DCP_FILE, at, len(data))
        at += len(data)
    metadata = pickle.dumps(Metadata(state_dict_metadata=entries, storage_data=storage))
    inside = f"{subfolder}/" if subfolder else ""
    return OutputLayout("dcp", (OutputFile(inside + DCP_FILE, tuple(s[0] for s in specs), tuple(frames)),),
                        ((inside + ".metadata", metadata),))


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
    from .torchsave import as_dict, read_archive, tensor_of

    obj = {k: v for k, v in saved.items() if k == model_key or not _holds_tensors(v)}
    obj[model_key] = {s[0]: _fake(s) for s in specs}
    try:
        file = _saved_without_data(obj)
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
        if not _nbytes(s):
            empty.append(s[0])
        elif at not in where or holes[where[at]][1] != _nbytes(s) or order[where[at]] is not None:
            raise RuntimeError(f"torch.save did not leave {s[0]!r} a range of its own: not a file ckptavg can frame")
        else:
            order[where[at]] = s[0]
    if None in order:
        raise RuntimeError("torch.save left a range unwritten that holds no tensor")
    return OutputLayout("torch", (OutputFile(filename, (*order, *empty), (*parts, *(b"" for _ in empty))),))


# -- the registry: each format ckptavg writes, declared once --


@dataclass(frozen=True)
class Newest:
    """What an output format takes from the newest input besides its tensors' names, read before planning
    (so that the plan stays pure): its trainer, and the format's own `source` of it."""

    trainer: str
    source: object = None


@dataclass(frozen=True)
class OutputFormat:
    """One format ckptavg writes. `source`: what it needs of the newest input (read once, before planning);
    `layout`: its files for tensors of `specs`, at most `shard_bytes` a file where it shards; `side_files`:
    (folder of the newest input, names to copy, where in the output) for what a loader needs beside the
    tensors."""

    name: str
    layout: Callable[[Sequence[Spec], int, Newest], OutputLayout]
    source: Callable[[Checkpoint], object] = lambda newest: None
    side_files: Callable[[Checkpoint], list[tuple[object, tuple[str, ...], str]]] = \
        lambda newest: [(newest.step_folder, SIDE_FILES, "")]


def split_specs(specs: Sequence[Spec], shard_bytes: int) -> list[list[Spec]]:
    """Greedy, order-preserving split into groups of at most `shard_bytes` (a bigger tensor gets its own)."""
    if shard_bytes <= 0:
        raise ValueError("shard size must be positive")
    groups: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + _nbytes(spec) > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += _nbytes(spec)
    return groups


def _dcp_source(newest: Checkpoint) -> tuple[tuple[str, bytes], ...]:
    from .dcp import model_bytes

    return tuple(model_bytes(newest.folder)) if newest.format == "dcp" else ()


def _dcp_side_files(newest: Checkpoint) -> list[tuple[object, tuple[str, ...], str]]:
    """A trainer's config beside its step's folder, and (for a DCP input) what it keeps beside its DCP data, in
    the folder the output's DCP data goes to."""
    files = [(newest.step_folder, SIDE_FILES, "")]
    if newest.format == "dcp":
        files.append((newest.folder, DCP_SIDE_FILES, DCP_SUBFOLDER_OF.get(newest.trainer, "")))
    return files


def _torch_source(newest: Checkpoint) -> tuple[dict, str]:
    from .torchsave import saved_object

    return saved_object(newest.files[0], newest.trainer)


OUTPUTS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("safetensors", lambda specs, shard_bytes, newest: safetensors_layout(split_specs(specs, shard_bytes))),
    OutputFormat("dcp", lambda specs, shard_bytes, newest: dcp_layout(specs, DCP_SUBFOLDER_OF.get(newest.trainer, ""),
                                                                      newest.source or ()),
                 _dcp_source, _dcp_side_files),
    OutputFormat("torch", lambda specs, shard_bytes, newest: torch_save_layout(
        *newest.source, specs, TORCH_SAVE_FILES[newest.trainer]), _torch_source),
)}
assert tuple(OUTPUTS) == OUTPUT_FORMATS
