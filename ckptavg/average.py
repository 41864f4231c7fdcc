"""Execute an `AveragePlan`: read, accumulate and write, overlapped, in bounded memory.

Three stages run at once, handing fixed-size pieces to each other through bounded queues:
a reader thread copies each input's piece of a tensor into a pooled buffer (large
sequential `pread`s), the calling thread accumulates the pieces in float32/float64 in
cache-sized chunks and casts once to the output dtype, and a writer thread appends the
result to the current output shard. File I/O and torch kernels release the GIL, so wall
time tends to the slowest stage rather than the sum, and memory is the buffer pools:
O(piece size x inputs), independent of model size.
"""

from __future__ import annotations

import os
import platform
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .errors import CkptavgError
from .hashing import file_sha256
from .plan import DEFAULT_COPY_PATTERNS, AveragePlan, TensorJob, check_weights, plan_average, uniform_weights
from .tensors import Checkpoint, TensorReader, open_checkpoint
from .writer import OutputDir, ShardFile, check_free_space, copy_side_files, write_index

PIECE_ELEMENTS = 4 * 1024 * 1024  # per input per hand-off: 8 MB of fp16
CHUNK_ELEMENTS = 1024 * 1024  # arithmetic granularity: keeps the fp32 temporaries in cache
PIPELINE_DEPTH = 3  # pieces in flight per stage boundary

Progress = Callable[[int], None]


@dataclass(frozen=True)
class _Piece:
    shard: int
    job: TensorJob
    start: int
    count: int


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's own message lists every backend it was built to know
        raise CkptavgError(f"unsupported device {device!r} (use auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CkptavgError("--device cuda was asked for, but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise CkptavgError(f"unsupported device {device!r} (use auto, cpu or cuda)")
    return dev


def _pieces(plan: AveragePlan, piece_elements: int) -> list[_Piece]:
    out = []
    for s, shard in enumerate(plan.shards):
        for job in shard.jobs:
            starts = range(0, job.numel, piece_elements) if job.numel else [0]
            out += [_Piece(s, job, a, min(piece_elements, job.numel - a)) for a in starts]
    return out


class _Stopped(Exception):
    pass


class _FileSink:
    """Streams finished pieces into the plan's safetensors shards, one shard file at a time."""

    def __init__(self, plan: AveragePlan, folder: Path) -> None:
        self.plan, self.folder = plan, folder
        self.file: ShardFile | None = None
        self.current = -1

    def write(self, p: _Piece, data: torch.Tensor) -> None:
        if p.shard != self.current:
            self.finish()
            self.current = p.shard
            self.file = ShardFile(self.folder / self.plan.shards[p.shard].filename, self.plan.shards[p.shard])
        self.file.write(data.numpy())

    def finish(self) -> None:
        if self.file is not None:
            self.file.finish()
            self.file = None

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()


class _MemorySink:
    """Assembles finished pieces into whole tensors: for scoring an average without writing it."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, p: _Piece, data: torch.Tensor) -> None:
        job = p.job
        if job.name not in self.tensors:
            self.tensors[job.name] = torch.empty(job.shape, dtype=job.out_dtype)
        flat = self.tensors[job.name].view(-1).view(torch.uint8)
        size = job.out_dtype.itemsize
        flat[p.start * size : (p.start + p.count) * size].copy_(data)

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        self.tensors.clear()


class _Pipeline:
    def __init__(self, plan: AveragePlan, sink: _FileSink | _MemorySink, device: torch.device,
                 piece_elements: int, progress: Progress | None) -> None:
        self.plan, self.sink, self.device = plan, sink, device
        self.progress = progress
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        jobs = plan.jobs
        # No buffer needs to be larger than the largest tensor: small models get small pools.
        piece_elements = max(1, min(piece_elements, max(j.numel for j in jobs)))
        self.pieces = _pieces(plan, piece_elements)
        n_in = max(len(j.sources) for j in jobs)
        in_bytes = piece_elements * max(r.dtype.itemsize for j in jobs for r in j.sources)
        out_bytes = piece_elements * max(j.out_dtype.itemsize for j in jobs)
        pin = device.type == "cuda"
        self.in_pool: queue.Queue[torch.Tensor] = queue.Queue()
        self.out_pool: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(PIPELINE_DEPTH * n_in):
            self.in_pool.put(torch.empty(in_bytes, dtype=torch.uint8, pin_memory=pin))
        for _ in range(PIPELINE_DEPTH):
            self.out_pool.put(torch.empty(out_bytes, dtype=torch.uint8, pin_memory=pin))
        self.read_q: queue.Queue = queue.Queue(PIPELINE_DEPTH)
        self.write_q: queue.Queue = queue.Queue(PIPELINE_DEPTH)
        chunk = piece_elements if device.type == "cuda" else min(CHUNK_ELEMENTS, piece_elements)
        self.acc = torch.empty(chunk, dtype=plan.accumulate, device=device)
        self.tmp = torch.empty(chunk, dtype=plan.accumulate, device=device)

    # -- plumbing ---------------------------------------------------------------------------
    def _get(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                continue

    def _put(self, q: queue.Queue, item) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.put(item, timeout=0.05)
            except queue.Full:
                continue

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except _Stopped:
                pass
            except BaseException as e:  # handed to the main thread, which re-raises it
                self.errors.append(e)
                self.stop.set()
        return run

    # -- stages -----------------------------------------------------------------------------
    def _read(self) -> None:
        with TensorReader() as reader:
            for p in self.pieces:
                bufs = [self._get(self.in_pool) for _ in p.job.sources]
                views = [reader.read(r, p.start, p.count, b) for r, b in zip(p.job.sources, bufs)]
                self._put(self.read_q, (p, bufs, views))
        self._put(self.read_q, None)

    def _write(self) -> None:
        done = False
        try:
            while (item := self._get(self.write_q)) is not None:
                p, buf = item
                nbytes = p.count * p.job.out_dtype.itemsize
                self.sink.write(p, buf[:nbytes])
                self.out_pool.put(buf)
                if self.progress is not None:
                    self.progress(nbytes)
            self.sink.finish()
            done = True
        finally:
            if not done:
                self.sink.abort()

    def _accumulate(self, views: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        w, k = self.plan.weights, self.plan.mean_of
        n, step = out.numel(), self.acc.numel()
        on_gpu = self.device.type == "cuda"
        for s in range(0, n, step):
            e = min(n, s + step)
            acc, tmp = self.acc[: e - s], self.tmp[: e - s]
            if k:  # a plain mean: sum, then one division
                acc.copy_(views[0][s:e], non_blocking=on_gpu)
                for v in views[1:]:
                    acc.add_(tmp.copy_(v[s:e], non_blocking=on_gpu))
                acc.div_(k)
            else:  # mul then add, never fused: the same rounding as the plain reference sum
                acc.copy_(views[0][s:e], non_blocking=on_gpu).mul_(w[0])
                for v, wi in zip(views[1:], w[1:]):
                    tmp.copy_(v[s:e], non_blocking=on_gpu).mul_(wi)
                    acc.add_(tmp)
            out[s:e].copy_(acc)  # the one cast to the output dtype (a synchronising copy on CUDA)

    def run(self) -> None:
        threads = [threading.Thread(target=self._guard(f), daemon=True, name=f"ckptavg-{f.__name__}")
                   for f in (self._read, self._write)]
        for t in threads:
            t.start()
        try:
            while (item := self._get(self.read_q)) is not None:
                p, bufs, views = item
                out_buf = self._get(self.out_pool)
                out = out_buf[: p.count * p.job.out_dtype.itemsize].view(p.job.out_dtype)
                if p.job.action == "copy":
                    out.copy_(views[0])
                else:
                    self._accumulate(views, out)
                for b in bufs:
                    self.in_pool.put(b)
                self._put(self.write_q, (p, out_buf))
            self._put(self.write_q, None)
            threads[1].join()
        except _Stopped:
            pass
        except BaseException:
            self.stop.set()
            raise
        finally:
            if self.errors:
                self.stop.set()
            for t in threads:
                t.join()
        if self.errors:
            raise self.errors[0]


def execute_plan(plan: AveragePlan, folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                 piece_elements: int = PIECE_ELEMENTS, progress: Progress | None = None) -> None:
    """Write the plan's shards (and index) into an existing folder."""
    _Pipeline(plan, _FileSink(plan, Path(folder)), resolve_device(device), piece_elements, progress).run()
    write_index(Path(folder), plan.shards)


def _open_and_plan(inputs: Sequence[str | os.PathLike | Checkpoint], weights: Sequence[float] | None,
                   normalize: bool, copy: Sequence[str], **plan_options) -> tuple[list[Checkpoint], AveragePlan]:
    checkpoints = [c if isinstance(c, Checkpoint) else open_checkpoint(c) for c in inputs]
    weights = check_weights(weights or uniform_weights(len(checkpoints)), len(checkpoints), normalize)
    patterns = tuple(dict.fromkeys((*DEFAULT_COPY_PATTERNS, *copy)))
    return checkpoints, plan_average(checkpoints, weights, copy_patterns=patterns, **plan_options)


def average_in_memory(inputs: Sequence[str | os.PathLike | Checkpoint], *, weights: Sequence[float] | None = None,
                      normalize: bool = True, out_dtype: torch.dtype | None = None,
                      accumulate: torch.dtype = torch.float32, device: str | torch.device = "auto",
                      copy: Sequence[str] = (), piece_elements: int = PIECE_ELEMENTS) -> dict[str, torch.Tensor]:
    """The same average as `average_checkpoints`, as a CPU state dict (names as stored), written nowhere.

    Holds the whole output in memory, which scoring the model needs anyway; the inputs are
    still streamed."""
    _, plan = _open_and_plan(inputs, weights, normalize, copy, out_dtype=out_dtype, accumulate=accumulate)
    sink = _MemorySink()
    _Pipeline(plan, sink, resolve_device(device), piece_elements, None).run()
    return sink.tensors


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "auto (as stored in the newest input)" if dtype is None else str(dtype).removeprefix("torch.")


def _versions() -> dict[str, str]:
    import safetensors

    return {"ckptavg": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def _describe_inputs(checkpoints: Sequence[Checkpoint], hashes: dict[Path, tuple[str, str]] | None,
                     extra: Sequence[dict] | None, plan: AveragePlan) -> list[dict]:
    inputs = []
    for i, c in enumerate(checkpoints):
        files = []
        for f in c.files:
            entry: dict = {"name": f.name, "size": f.stat().st_size}
            if hashes is not None:
                entry["sha256"], entry["sha256_source"] = hashes[f]
            files.append(entry)
        described = {"path": str(c.path.absolute()), "format": c.format, "files": files}
        if plan.absent and plan.absent[i]:
            described["absent_buffers"] = list(plan.absent[i])
        inputs.append(described | (extra[i] if extra else {}))
    return inputs


def average_checkpoints(
    inputs: Sequence[str | os.PathLike | Checkpoint],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
    accumulate: torch.dtype = torch.float32,
    device: str | torch.device = "auto",
    shard_bytes: int = 5 * 10**9,
    force: bool = False,
    hash_inputs: bool = True,
    copy: Sequence[str] = (),
    method: dict | None = None,
    input_info: Sequence[dict] | None = None,
    run: dict | None = None,
    piece_elements: int = PIECE_ELEMENTS,
    progress: Callable[[AveragePlan], Progress | None] | None = None,
) -> Path:
    """Average checkpoints (oldest first, newest last) into the Hugging Face model folder `out`.

    Config and tokenizer files, and every tensor that is not averaged, come from the newest
    input. Tensors that are never averaged (non-float tensors, Pythia's non-trained buffers and
    names matching a `copy` pattern) may be absent from some inputs; the manifest says which.
    `method`, `input_info` and `run` are recorded verbatim in the manifest, so callers such as
    trajectory runs can say where the inputs came from and which run (model, tag) the output
    belongs to. Returns the output folder.
    """
    output = OutputDir(out, force=force)
    output.check()
    dev = resolve_device(device)
    checkpoints, plan = _open_and_plan(inputs, weights, normalize, copy, out_dtype=out_dtype,
                                       accumulate=accumulate, shard_bytes=shard_bytes)
    output.final.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(output.final.parent, plan.output_bytes)
    started = time.time()
    with output, ThreadPoolExecutor(1, thread_name_prefix="ckptavg-hash") as pool:
        files = sorted({f for c in checkpoints for f in c.files})
        pending = {f: pool.submit(file_sha256, f) for f in files} if hash_inputs else {}
        execute_plan(plan, output.path, device=dev, piece_elements=piece_elements,
                     progress=progress(plan) if progress else None)
        side = copy_side_files(checkpoints[-1].folder, output.path)
        hashes = {f: fut.result() for f, fut in pending.items()} if hash_inputs else None
        manifest = {
            "ckptavg_manifest": 1,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "method": method or {"name": "weighted_average"},
            **({"run": run} if run else {}),
            "weights": list(plan.weights),
            "normalized": normalize,
            "inputs": _describe_inputs(checkpoints, hashes, input_info, plan),
            "dtype_policy": {
                "output": _dtype_name(out_dtype),
                "accumulate": _dtype_name(accumulate),
                "not_averaged": "copied from the newest input: non-float tensors and non-trained buffers; "
                                "the output holds one exactly when the newest input does",
                "copy_patterns": list(plan.copy_patterns),
            },
            "copied_tensors": plan.copied,
            "output": {
                "files": [{"name": s.filename, "tensors": len(s.jobs), "bytes": s.nbytes} for s in plan.shards],
                "tensor_bytes": plan.output_bytes,
                "side_files_from_newest_input": side,
            },
            "device": str(dev),
            "seconds": round(time.time() - started, 3),
            "versions": _versions(),
        }
        output.commit(manifest, fsync_files=[output.path / n for n in side])
    return output.final
