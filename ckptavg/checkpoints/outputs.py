"""What a format declares (`Format`), and how an output checkpoint's files are laid out, from names, dtypes
and shapes alone: so that the engine streams every tensor's bytes straight into place, knowing no format.
Each format's own module (`safetensors_header.py`, `torchsave.py`, `dcp.py`) declares its `FORMAT`, and
`formats.py` lists them.

A file is written front to back as `frames[0]`, the first tensor's bytes, `frames[1]`, the second's, ...,
`frames[-1]`: the bytes between the tensors depend only on the plan. Small files that describe the
others (a safetensors index, DCP's `.metadata`) are given whole.

- safetensors: a header, then the tensors back to back.
- torch (a trainer's own `torch.save` file: Lightning's `.ckpt`, nanoGPT's `ckpt.pt`, DeepSpeed's
  `mp_rank_00_model_states.pt`): the newest input's saved object with its model entry holding the
  average, and its other entries that hold tensors (optimizer state, a best score) left out, so
  that the trainer's loader takes it as a model (`load_from_checkpoint`, nanoGPT's sample.py,
  DeepSpeed's `load_module_only`), not as a run to resume. Framed like DCP's records.
- DCP: `__0_0.distcp` (and `__1_0.distcp`, ... where the tensors are more than a shard's bytes: DCP's
  names for the files of ranks 0, 1, ...) of `torch.save` records, one per tensor (one chunk each, as
  `dcp.save` writes an unsharded tensor), and a `.metadata` that torch's own reader and the trainers' loaders
  read. Each record is framed by `torch.save` itself, told to skip the tensor's bytes
  (`torch.serialization.skip_data`, on a fake tensor that owns no memory), which leaves the space the
  engine fills. As with `torch.serialization.set_crc32_options(False)`, the records carry no CRC-32 of
  their data (torch's reader checks none), so no pass over the bytes is spent on one.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .index import Checkpoint, TensorRef
from .names import SIDE_FILES

Spec = tuple[str, torch.dtype, tuple[int, ...]]  # a tensor's name, dtype and shape


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


def spec_nbytes(spec: Spec) -> int:
    n = spec[1].itemsize
    for d in spec[2]:
        n *= d
    return n


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


def saved_without_data(obj: object) -> _Holes:
    """`obj` as `torch.save` writes it, with every storage's bytes left out."""
    from torch.serialization import skip_data

    f = _Holes()
    with skip_data(materialize_fake_tensors=True):
        torch.save(obj, f)
    return f


def split_sizes(sizes: Sequence[int], shard_bytes: int) -> list[list[int]]:
    """Greedy, order-preserving split of items of `sizes` into groups (of their indices) of at most
    `shard_bytes` (a bigger item gets its own)."""
    if shard_bytes <= 0:
        raise ValueError("shard size must be positive")
    groups: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(sizes):
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def split_specs(specs: Sequence[Spec], shard_bytes: int) -> list[list[Spec]]:
    return [[specs[i] for i in group] for group in split_sizes([spec_nbytes(s) for s in specs], shard_bytes)]


def fake(spec: Spec) -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(spec[2], dtype=spec[1])


# -- what a format declares --


@dataclass(frozen=True)
class Newest:
    """What an output format takes from the newest input besides its tensors' names, read before planning
    (so that the plan stays pure): its trainer, and the format's own `source` of it."""

    trainer: str
    source: object = None


# (a folder of the newest input, the names to copy from it, where in the output they go)
SideFiles = list[tuple[object, tuple[str, ...], str]]


def config_files(newest: Checkpoint) -> SideFiles:
    """A model's config and tokenizer files, from the folder of the newest input's step."""
    return [(newest.step_folder, SIDE_FILES, "")]


@dataclass(frozen=True)
class Format:
    """One encoding ckptavg reads and writes, declared once, in its own module: what a checkpoint of it is
    called (`name`, a `Checkpoint`'s format) and what its output is called (`output`, `--output-format`'s
    name), how a file of it is indexed (`index_file`: (trainer, tensors), every check made; a folder format,
    DCP, is indexed by its module), which files named alone are of it (`suffixes`), and how an output of it
    is made: what it needs of the newest input (`source`, read once before planning), its files for tensors
    of given specs at most so many bytes a file where it `shards` (`layout`: one file otherwise, which one
    rank of several writes alone), and what a loader needs beside the tensors (`side_files`)."""

    name: str
    output: str
    layout: Callable[[Sequence[Spec], int, Newest], OutputLayout]
    index_file: Callable[[Path], tuple[str, dict[str, TensorRef]]] | None = None
    suffixes: tuple[str, ...] = ()
    source: Callable[[Checkpoint], object] = lambda newest: None
    side_files: Callable[[Checkpoint], SideFiles] = config_files
    shards: bool = True
