"""The typed index of a checkpoint that every format turns its files into: each tensor's name, dtype, global
shape, and the byte ranges of files that hold it. The engine (reader, planner, hashing, pipeline) reads
only this, and so knows no format.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

import torch

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
    """Where one tensor lives. `offset` is its absolute byte offset in `file`; None for a tensor of a
    `torch.save` file without one (a strided view, a legacy file: `torchsave.index_file`), which is copied
    out of torch's mapping of the file."""

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
    format: str  # how its bytes are encoded: "safetensors" | "bin" (torch.save archives) | "dcp"
    files: tuple[Path, ...]
    tensors: dict[str, TensorRef]
    label: str | None = None  # what errors call it (a trajectory's revision name); the path by default
    # whose layout it is: "transformers", "torch" (a bare state dict file), "lightning", "nanogpt",
    # "deepspeed", "olmo-core", "megatron", "accelerate", "dcp" (a DCP folder of no trainer known)
    trainer: str = "transformers"

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def step_folder(self) -> Path:
        """The folder of the step it belongs to: a trainer's config and tokenizer files sit there, beside
        the DCP folder it saves inside (OLMo-core's model_and_optim/)."""
        from .names import DCP_SUBFOLDERS

        return self.folder.parent if self.format == "dcp" and self.folder.name in DCP_SUBFOLDERS else self.folder

    @property
    def shown(self) -> str:
        return self.label or str(self.path)


