"""safetensors files: the header parsed and checked here, because the engine needs each tensor's byte offset
to read it with large `pread` calls (or map it) instead of through the safetensors library; and written
(a header, then the tensors back to back; shards and an index past a size)."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

from ..errors import CorruptCheckpointError, with_path
from .index import DTYPE_NAMES, SAFETENSORS_DTYPES, TensorRef
from .names import SAFETENSORS_INDEX
from .outputs import Format, OutputFile, OutputLayout, Spec, spec_nbytes, split_specs

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors crate's own limit


def read_safetensors_header(file: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Parse and fully validate a safetensors header, so a truncated file fails before any work."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(f"{file}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CorruptCheckpointError(f"{file}: corrupt or truncated safetensors header")
            raw = f.read(n)
    except OSError as e:  # unreadable (permissions, EIO): the CLI's one line for the operating system's errors
        raise with_path(e, file) from None
    header = strict_json(raw, f"{file}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{file}: corrupt safetensors header (__metadata__ is not strings by name)")
    data_start = 8 + n
    refs: dict[str, TensorRef] = {}
    spans = []
    for name, entry in header.items():
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) and isinstance(
            entry.get("dtype"), str) else None
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
        if dtype is None or not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2:
            raise CorruptCheckpointError(f"{file}: bad header entry for tensor {name[:200]!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CorruptCheckpointError(f"{file}: tensor {name[:200]!r} has inconsistent data offsets")
        refs[name] = TensorRef(name, dtype, tuple(shape), file, data_start + begin)
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


def _naturals(value: object) -> bool:
    """A JSON list of non-negative integers (a shape, offsets): no floats, bools, strings or negatives."""
    return isinstance(value, list) and len(value) <= 64 and all(type(v) is int and 0 <= v < 1 << 62 for v in value)


def strict_json(raw: bytes | str, what: str) -> object:
    """JSON as a checkpoint's header or index must be: no key twice (parsers disagree on which one wins), no
    NaN or infinity, nesting Python can parse; else a `CorruptCheckpointError` saying `what`."""
    def pairs(items: list[tuple[str, object]]) -> dict:
        found = dict(items)
        if len(found) != len(items):
            raise ValueError("a key appears twice")
        return found

    def constant(name: str) -> object:
        raise ValueError(f"{name} is not a JSON number")

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text[:50]} is out of range")
        return value

    try:
        return json.loads(raw, object_pairs_hook=pairs, parse_constant=constant, parse_float=number)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        detail = "nested too deep" if isinstance(e, RecursionError) else str(e).splitlines()[0][:200]
        raise CorruptCheckpointError(f"{what} ({detail})") from None


def safetensors_header(specs: Sequence[Spec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header of a file holding `specs` back to back, in order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec[0]] = {"dtype": DTYPE_NAMES[spec[1]], "shape": list(spec[2]),
                           "data_offsets": [offset, offset + spec_nbytes(spec)]}
        offset += spec_nbytes(spec)
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
        index = {"metadata": {"total_size": sum(spec_nbytes(s) for g in groups for s in g)},
                 "weight_map": {s[0]: f.filename for f, g in zip(files, groups, strict=True) for s in g}}
        extra = ((SAFETENSORS_INDEX, (json.dumps(index, indent=2) + "\n").encode()),)
    return OutputLayout("safetensors", files, extra)


FORMAT = Format("safetensors", "safetensors",
                lambda specs, shard_bytes, newest: safetensors_layout(split_specs(specs, shard_bytes)),
                lambda file: ("transformers", read_safetensors_header(file)[0]), (".safetensors",))
