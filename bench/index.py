"""What indexing a checkpoint costs (`open_checkpoint`: the format layer's every check, no tensor data read),
for a `torch.save` file and a DCP folder of 400 float16 tensors, and a DCP `.metadata` of 64,000 chunks read
into records against `pickle.loads`; with `--baseline DIR`, the same from another checkout (an earlier commit:
`git worktree add /tmp/base REV`) in the same run.

    python bench/index.py [--reps 7] [--baseline /tmp/base]
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TIMER = """
import sys, time
from ckptavg.checkpoints.open import open_checkpoint
for what in sys.argv[2:]:
    for _ in range(int(sys.argv[1])):
        t = time.perf_counter(); open_checkpoint(what); print(what, time.perf_counter() - t)
"""


def write_inputs(folder: Path) -> tuple[Path, Path]:
    import torch
    import torch.distributed.checkpoint as dcp

    sd = {f"gpt_neox.layers.{i // 8}.w{i % 8}.weight": torch.zeros(64, 64, dtype=torch.float16) for i in range(400)}
    (folder / "bin").mkdir()
    torch.save(sd, folder / "bin" / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(folder / "dcp"), no_dist=True)
    return folder / "bin", folder / "dcp"


def index_times(checkout: Path, reps: int, inputs: tuple[Path, Path]) -> dict[str, list[float]]:
    r = subprocess.run([sys.executable, "-c", TIMER, str(reps), *map(str, inputs)], capture_output=True, text=True,
                       check=True, env=dict(os.environ, PYTHONPATH=str(checkout)))
    times: dict[str, list[float]] = {}
    for line in r.stdout.splitlines():
        what, seconds = line.rsplit(" ", 1)
        times.setdefault(Path(what).name, []).append(float(seconds))
    return times


def metadata_times(reps: int) -> tuple[list[float], list[float]]:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from ckptavg.checkpoints import dcp

    entries, storage = {}, {}
    for t in range(1000):
        chunks = []
        for r in range(64):
            offsets = torch.Size([r * 16, 0])
            chunks.append(ChunkStorageMetadata(offsets, torch.Size([16, 1024])))
            storage[MetadataIndex(f"model.layers.{t}.weight", offsets)] = _StorageInfo(f"__{r}_0.distcp", t, 1)
        entries[f"model.layers.{t}.weight"] = TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16),
                                                                    torch.Size([1024, 1024]), chunks)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ".metadata"
        path.write_bytes(pickle.dumps(Metadata(state_dict_metadata=entries, storage_data=storage)))
        plain, ours = [], []
        for _ in range(reps):
            t = time.perf_counter()
            pickle.loads(path.read_bytes())
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            dcp._read_one(path)
            ours.append(time.perf_counter() - t)
    return plain, ours


def show(label: str, times: list[float]) -> str:
    return f"{label}: min {min(times) * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--baseline", type=Path, help="another checkout, timed in the same run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_inputs(Path(tmp))
        for checkout in [ROOT, *([args.baseline] if args.baseline else [])]:
            for what, times in index_times(checkout, args.reps, inputs).items():
                print(show(f"{checkout} {what}", times))
    plain, ours = metadata_times(3)
    print(show("64,000-chunk .metadata, pickle.loads", plain))
    print(show("64,000-chunk .metadata, ckptavg's records", ours))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
