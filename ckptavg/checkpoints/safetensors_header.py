"""safetensors files: the header parsed and checked here, because the engine needs each tensor's byte offset
to read it with large `pread` calls (or map it) instead of through the safetensors library."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from ..errors import CorruptCheckpointError, with_path
from .index import SAFETENSORS_DTYPES, TensorRef

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
