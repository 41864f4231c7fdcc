"""Read back what a W&B offline run logged: the history rows of its `run-ID.wandb` transaction log.

wandb 0.31 moved its reader into its Go core (wandb-core), so there is no Python one to call. The file is
the LevelDB log format under a 7-byte ":W&B" header: 32 KiB blocks of records, each a 7-byte header
(CRC32, length, type: full, first, middle, last) and its bytes; a record is one protobuf `Record`, which
wandb's own `wandb_internal_pb2` parses. Only the framing is read here.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        body = data[pos + HEADER:pos + HEADER + length]
        if kind == 0 and length == 0:  # zeros: the writer padded or stopped here
            pos += left
            continue
        assert zlib.crc32(bytes([kind]) + body) & 0xFFFFFFFF == crc, f"{path}: bad record at byte {pos}"
        pos += HEADER + length
        if kind == FULL:
            out.append(body)
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            out.append(pending + body)
            pending = b""
    return out


def history(path: Path) -> list[dict]:
    """Each `run.log` call's row, {key: value}, in the order logged."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
