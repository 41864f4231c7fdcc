"""Execute an `AveragePlan`: read, accumulate and write, overlapped, in bounded memory.

Stages run at once, each in a thread of its own, handing fixed-size pieces to each other through
bounded queues: a reader thread fetches each input's piece of a tensor (on a CPU mapped straight from
the page cache, or read from disk with one large direct `pread` into a pooled buffer: see
`TensorReader`), arithmetic threads (half the cores) accumulate each piece's slices in L2-sized chunks
(in float32 for 16-bit inputs, float64 for float32 ones: `plan.accumulation_dtype`) and cast once to
the output dtype, a writer thread appends the result to the current output shard (or, for scoring
without writing, to tensors in memory), and, when input files are to be hashed, hashing threads (one
per core at most, each owning some of the files) feed the same input bytes to their files' sha256
before the buffers go back to the pool, so that no file is read twice. File I/O, torch kernels and
hashlib release the GIL, so wall time tends to the slowest stage rather than the sum, and memory is
the buffer pools: O(piece size x inputs), independent of model size.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import queue
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CkptavgError
from ..hashing import FileHasher
from ..storage.base import finish_reads
from ..storage.paths import RemotePath
from .plan import AveragePlan, Shard, TensorJob
from .tensors import DIRECT_SLACK, TensorReader
from .upload import open_shard
from .writer import ShardFile, write_extra_files

PIECE_ELEMENTS = 4 * 1024 * 1024  # per input per hand-off: 8 MB of fp16
# Arithmetic granularity: an accumulator and a temporary of this size stay in a core's L2 cache over
# the k passes of a chunk (measured here: 1.8x the speed of 4 MB chunks, which spill to L3).
CHUNK_BYTES = 512 * 1024
PIPELINE_DEPTH = 3  # pieces in flight per stage boundary
READ_AHEAD = 3  # pieces on an object store asked for before the oldest of them has arrived

Progress = Callable[[int], None]


@dataclass(frozen=True)
class _Piece:
    shard: int
    job: TensorJob
    start: int
    count: int


def available_cores() -> int:
    """The cores this process may run on (a Slurm job's allocation, not the whole node's), shared with the
    other ranks torchrun started on this node where they all may run on every core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    if local.isdigit() and int(local) > 1 and cores == os.cpu_count():
        return max(1, cores // int(local))
    return cores


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


@functools.cache
def _openmp():
    import threadpoolctl

    return threadpoolctl.ThreadpoolController().select(user_api="openmp")


def _one_intra_op_thread() -> None:
    """Run torch's kernels in the calling thread on that thread alone, for the rest of its life.

    The pipeline's threads share the cores with each other: torch's own intra-op threads would wait
    at the end of every kernel for a core the reader, writer or hashers hold (20-35% slower on 2 cores:
    docs/how-it-works.md). `torch.set_num_threads` would change the whole process (a caller's model scoring in
    another thread, every thread started meanwhile); OpenMP's thread count, which torch's CPU kernels
    follow, belongs to the thread that sets it, so it is set here, per thread, through threadpoolctl.
    Where torch runs no OpenMP, nothing is changed."""
    torch.get_num_threads()  # torch sets a thread's OpenMP count when the thread first asks: before ours
    _openmp().limit(limits=1)


def _worth_caching(files: Sequence[Path], available: int | None = None) -> Sequence[Path]:
    """`files` (the plan's `reread`) if they would still be in the page cache when read again (they fit
    in half of `available`, by default the memory the kernel calls available), else none: reading
    through a cache that evicts them before they are read again only costs CPU. The reader reads the
    files it returns through the page cache even from disk (see `TensorReader`)."""
    if available is None:
        try:
            meminfo = Path("/proc/meminfo").read_text().split()
            available = int(meminfo[meminfo.index("MemAvailable:") + 1]) * 1024
        except (OSError, ValueError):  # not Linux: no direct reads either (see TensorReader)
            return files
    return files if sum(f.stat().st_size for f in files) <= available // 2 else ()


def _pieces(plan: AveragePlan, piece_elements: int) -> list[_Piece]:
    out = []
    for s, shard in enumerate(plan.shards):
        for job in shard.jobs:
            if not job.numel:
                out.append(_Piece(s, job, 0, 0))
                continue
            # no piece crosses a boundary between the stored pieces of any input (a sharded save)
            cuts = sorted({0, job.numel, *(b for r in job.sources for b in r.boundaries)})
            for lo, hi in itertools.pairwise(cuts):
                out += [_Piece(s, job, a, min(piece_elements, hi - a)) for a in range(lo, hi, piece_elements)]
    return out


class _Stopped(Exception):
    pass


class _FileSink:
    """Streams finished pieces into the plan's output files, one file at a time."""

    def __init__(self, plan: AveragePlan, folder: Path | RemotePath,
                 on_file: Callable[[Shard], None] | None = None) -> None:
        self.plan, self.folder, self.on_file = plan, folder, on_file
        self.file: ShardFile | None = None
        self.current = -1

    def write(self, p: _Piece, data: torch.Tensor) -> None:
        if p.shard != self.current:
            self.finish()
            self.current = p.shard
            self.file = open_shard(self.folder / self.plan.shards[p.shard].filename, self.plan.shards[p.shard])
        self.file.write(data.numpy())

    def finish(self) -> None:
        if self.file is not None:
            self.file.finish()
            self.file = None
            if self.on_file is not None:
                self.on_file(self.plan.shards[self.current])

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


class _IntoSink:
    """Copies finished pieces straight into existing tensors (a resident model's parameters, on its
    device), cast to their dtype as loading the written output would cast it; names without a
    destination are never read (`wanted`)."""

    def __init__(self, destinations: dict[str, torch.Tensor]) -> None:
        self.destinations = destinations
        self.wanted = set(destinations)

    def write(self, p: _Piece, data: torch.Tensor) -> None:
        flat = self.destinations[p.job.name].view(-1)
        flat[p.start : p.start + p.count].copy_(data.view(p.job.out_dtype))

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


Sink = _FileSink | _MemorySink | _IntoSink


class _Pipeline:
    def __init__(self, plan: AveragePlan, sink: Sink, device: torch.device,
                 piece_elements: int, progress: Progress | None, hash_files: Collection[Path] = ()) -> None:
        self.plan, self.sink, self.device = plan, sink, device
        self.keep_cached = _worth_caching(sorted(plan.reread))
        self.progress = progress
        self.hashers = {f: FileHasher(f) for f in hash_files}
        # each file's bytes go to one thread, in order; files are dealt out to threads in turn
        n_hash = min(len(self.hashers), available_cores())
        self.hash_qs: list[queue.Queue] = [queue.Queue() for _ in range(n_hash)]
        self.hash_owner = {f: self.hash_qs[i % n_hash] for i, f in enumerate(self.hashers)}
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        wanted = getattr(sink, "wanted", None)
        jobs = [j for j in plan.jobs if wanted is None or j.name in wanted]
        # No buffer needs to be larger than the largest tensor: small models get small pools.
        piece_elements = max(1, min(piece_elements, max((j.numel for j in jobs), default=1)))
        self.pieces = [p for p in _pieces(plan, piece_elements) if wanted is None or p.job.name in wanted]
        n_in = max((len(j.sources) for j in jobs), default=1)
        piece_bytes = piece_elements * max((r.dtype.itemsize for j in jobs for r in j.sources), default=1)
        # room for the reader to read from disk straight into the buffer (whole aligned blocks)
        in_bytes = piece_bytes + DIRECT_SLACK
        out_bytes = piece_elements * max((j.out_dtype.itemsize for j in jobs), default=1)
        pin = device.type == "cuda"
        # results bound for tensors on the device stay there: no round trip through host memory
        out_device = device if isinstance(sink, _IntoSink) else torch.device("cpu")
        self.in_pool: queue.Queue[torch.Tensor] = queue.Queue()
        self.out_pool: queue.Queue[torch.Tensor] = queue.Queue()
        # hashing keeps input buffers a stage longer
        remote = any(isinstance(r.file, RemotePath) for j in jobs for r in j.sources)
        self.read_ahead = READ_AHEAD if remote else 0
        for _ in range((PIPELINE_DEPTH + self.read_ahead + (2 if self.hashers else 0)) * n_in):
            self.in_pool.put(torch.empty(in_bytes, dtype=torch.uint8, pin_memory=pin))
        for _ in range(PIPELINE_DEPTH):
            self.out_pool.put(torch.empty(out_bytes, dtype=torch.uint8, device=out_device,
                                          pin_memory=pin and out_device.type == "cpu"))
        self.read_q: queue.Queue = queue.Queue(PIPELINE_DEPTH)
        self.write_q: queue.Queue = queue.Queue(PIPELINE_DEPTH)
        # On a GPU one thread launches whole pieces. On a CPU a piece is cut into slices, one per
        # arithmetic thread, each with its own accumulator and temporary, and torch runs each
        # kernel on one thread: its own intra-op threads would wait at the end of every kernel for
        # a core the reader, writer or hashers hold, which measured 20-35% slower on 2 cores.
        on_gpu = device.type == "cuda"
        self.workers = 1 if on_gpu else max(1, available_cores() // 2)
        # an accumulator and a temporary per thread, raw bytes viewed as each tensor's accumulation dtype
        widest = max((j.accumulate.itemsize for j in jobs if j.action == "average"), default=4)
        scratch = piece_elements * widest if on_gpu else min(CHUNK_BYTES, piece_elements * widest)
        self.scratch = [(torch.empty(scratch, dtype=torch.uint8, device=device),
                         torch.empty(scratch, dtype=torch.uint8, device=device)) for _ in range(self.workers)]
        # On a GPU, inputs cross to the device and results back in their stored dtypes, and are converted
        # there: torch converts a host tensor on the host before copying it (one thread, twice the bytes).
        self.to_device = torch.empty(piece_bytes, dtype=torch.uint8, device=device) if on_gpu else None
        self.from_device = (torch.empty(out_bytes, dtype=torch.uint8, device=device)
                            if on_gpu and out_device.type == "cpu" else None)

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
                _one_intra_op_thread()
                fn()
            except _Stopped:
                pass
            except BaseException as e:  # handed to the main thread, which re-raises it
                self.errors.append(e)
                self.stop.set()
        return run

    # -- stages -----------------------------------------------------------------------------
    def _read(self) -> None:
        # on a CPU the arithmetic reads the page cache in place; pinned buffers bound for a GPU are filled.
        # Pieces on an object store are asked for up to READ_AHEAD pieces ahead of the one handed on, so
        # that the link waits neither for the arithmetic nor for the slowest GET of a piece.
        ahead: collections.deque = collections.deque()

        def hand_on() -> None:
            piece, bufs, reads = ahead.popleft()
            self._put(self.read_q, (piece, bufs, reads.result()))

        try:
            with TensorReader(map_files=self.device.type == "cpu", keep_cached=self.keep_cached) as reader:
                for p in self.pieces:
                    bufs = [self._get(self.in_pool) for _ in p.job.sources]
                    asked = [(*r.at(p.start), p.count, b) for r, b in zip(p.job.sources, bufs, strict=True)]
                    ahead.append((p, bufs, reader.start_many(asked)))
                    while ahead and (len(ahead) > self.read_ahead or ahead[0][2].done):
                        hand_on()
                while ahead:
                    hand_on()
        finally:  # no GET still writes into a buffer once this stage is over
            for *_, reads in ahead:
                finish_reads(reads.futures, raise_first=False)
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

    def _release(self, p: _Piece, bufs: Sequence[torch.Tensor], views: Sequence[torch.Tensor]) -> None:
        """Give a piece's input buffers back to the pool, through their file's hashing thread if it is
        hashed (the queues need no bound: the pool bounds what is in flight, mapped or not)."""
        for ref, buf, view in zip(p.job.sources, bufs, views, strict=True):
            piece, start = ref.at(p.start)
            q = self.hash_owner.get(piece.file)
            if q is not None and piece.offset is not None:
                q.put((self.hashers[piece.file], piece.offset + start * piece.dtype.itemsize, view, buf))
            else:  # memory-mapped `.bin` storage: its hasher reads the file whole at the end
                self.in_pool.put(buf)

    def _hash(self, q: queue.Queue) -> Callable[[], None]:
        def _hash() -> None:
            while (item := self._get(q)) is not None:
                hasher, offset, view, buf = item
                hasher.update(offset, memoryview(view.view(torch.uint8).numpy()))
                self.in_pool.put(buf)
                del item, view  # a mapped range is unmapped when its last view goes
            for f, owner in self.hash_owner.items():
                if owner is q:
                    self.hashers[f].hexdigest()
        return _hash

    def _accumulate(self, views: Sequence[torch.Tensor], out: torch.Tensor, dtype: torch.dtype,
                    pool: ThreadPoolExecutor | None) -> None:
        """`out` = the weighted sum of `views`, summed in `dtype`, slice by slice in parallel (the slices
        are whole chunks, so the chunking, and with it every rounding, is the same however many threads
        there are)."""
        scratch = [(a[: a.numel() // dtype.itemsize * dtype.itemsize].view(dtype),
                    t[: t.numel() // dtype.itemsize * dtype.itemsize].view(dtype)) for a, t in self.scratch]
        n, step = out.numel(), scratch[0][0].numel()
        if not n:  # a tensor of no elements (safetensors and torch.save write them): nothing to add
            return
        chunks = -(-n // step)
        per = -(-chunks // min(self.workers, chunks)) * step
        slices = [(a, min(n, a + per)) for a in range(0, n, per)]
        if pool is None or len(slices) == 1:
            for i, (a, b) in enumerate(slices):
                self._accumulate_slice(views, out, a, b, *scratch[i])
            return
        done = [pool.submit(self._accumulate_slice, views, out, a, b, *scratch[i])
                for i, (a, b) in enumerate(slices[1:], 1)]
        self._accumulate_slice(views, out, *slices[0], *scratch[0])
        for d in done:
            d.result()

    def _accumulate_slice(self, views: Sequence[torch.Tensor], out: torch.Tensor, start: int, end: int,
                          acc_buf: torch.Tensor, tmp_buf: torch.Tensor) -> None:
        w, k = self.plan.weights, self.plan.mean_of
        step = acc_buf.numel()
        for s in range(start, end, step):
            e = min(end, s + step)
            acc, tmp = acc_buf[: e - s], tmp_buf[: e - s]
            if k:  # a plain mean: sum, then one division
                acc.copy_(self._load(views[0][s:e]))
                for v in views[1:]:
                    acc.add_(tmp.copy_(self._load(v[s:e])))
                acc.div_(k)
            else:  # mul then add, never fused: the same rounding as the plain reference sum
                acc.copy_(self._load(views[0][s:e])).mul_(w[0])
                for v, wi in zip(views[1:], w[1:], strict=True):
                    tmp.copy_(self._load(v[s:e])).mul_(wi)
                    acc.add_(tmp)
            self._store(out[s:e], acc)  # the one cast to the output dtype

    def _load(self, v: torch.Tensor) -> torch.Tensor:
        """`v` where the arithmetic runs, as stored: on a GPU, a copy queued from its pinned buffer (one
        staging buffer serves every input, in stream order)."""
        if self.to_device is None:
            return v
        return self.to_device[: v.numel() * v.element_size()].view(v.dtype).copy_(v, non_blocking=True)

    def _store(self, out: torch.Tensor, acc: torch.Tensor) -> None:
        """`acc` cast to `out`'s dtype on the device that holds it, then copied (a result bound for host
        memory is cast on the GPU and copied back, which waits for the work queued before it)."""
        if self.from_device is None:
            out.copy_(acc)
        else:
            out.copy_(self.from_device[: out.numel() * out.element_size()].view(out.dtype).copy_(acc))

    def _arithmetic(self) -> None:
        pool = (ThreadPoolExecutor(self.workers - 1, "ckptavg-arithmetic", initializer=_one_intra_op_thread)
                if self.workers > 1 else None)
        try:
            while (item := self._get(self.read_q)) is not None:
                p, bufs, views = item
                out_buf = self._get(self.out_pool)
                out = out_buf[: p.count * p.job.out_dtype.itemsize].view(p.job.out_dtype)
                if p.job.action == "copy":
                    out.copy_(views[0])
                else:
                    self._accumulate(views, out, p.job.accumulate, pool)
                if out.is_cuda:
                    # the copies from the input buffers to the device are queued, maybe not yet done (a
                    # result bound for host memory waits for them; one that stays on the device does
                    # not): the reader must not refill those buffers before they are
                    torch.cuda.current_stream(out.device).synchronize()
                self._release(p, bufs, views)
                del views  # (mapped ranges: see _hash)
                self._put(self.write_q, (p, out_buf))
            self._put(self.write_q, None)
            for q in self.hash_qs:
                q.put(None)
        finally:
            if pool is not None:
                pool.shutdown()

    def run(self) -> None:
        """Every stage runs in a thread of its own, the caller's thread only waits: torch's thread count
        is set for the pipeline's threads alone (`_one_intra_op_thread`), never for the caller's."""
        stages = (self._arithmetic, self._read, self._write, *(self._hash(q) for q in self.hash_qs))
        threads = [threading.Thread(target=self._guard(f), daemon=True, name=f"ckptavg-{f.__name__}")
                   for f in stages]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # Ctrl-C while waiting: stop every stage, then let it through
            self.stop.set()
            for t in threads:
                t.join()
            raise
        if self.errors:
            raise self.errors[0]


def execute_plan(plan: AveragePlan, folder: str | os.PathLike | RemotePath, *, device: str | torch.device = "cpu",
                 piece_elements: int = PIECE_ELEMENTS, progress: Progress | None = None,
                 hash_files: Collection[Path] = (), on_file: Callable[[Shard], None] | None = None
                 ) -> dict[Path, FileHasher]:
    """Write the plan's output files (and its index or metadata) into an existing folder, calling `on_file`
    with each once it is whole and durable. Returns a finished hasher of each of `hash_files` (input files),
    fed the bytes the reader read: each file is read once."""
    folder = folder if isinstance(folder, RemotePath) else Path(folder)
    pipeline = _Pipeline(plan, _FileSink(plan, folder, on_file), resolve_device(device), piece_elements, progress,
                         hash_files)
    pipeline.run()
    write_extra_files(folder, plan.extra_files)
    return pipeline.hashers


def execute_in_memory(plan: AveragePlan, device: torch.device, piece_elements: int = PIECE_ELEMENTS
                      ) -> dict[str, torch.Tensor]:
    """The plan's output tensors, assembled in memory (CPU), written nowhere."""
    sink = _MemorySink()
    _Pipeline(plan, sink, device, piece_elements, None).run()
    return sink.tensors


def execute_into(plan: AveragePlan, destinations: dict[str, torch.Tensor], device: torch.device,
                 piece_elements: int = PIECE_ELEMENTS) -> None:
    """Write the plan's output tensors named in `destinations` into those tensors, in place; the
    plan's other tensors are not read. Host memory stays O(piece size x inputs)."""
    for job in plan.jobs:
        dest = destinations.get(job.name)
        if dest is not None and (dest.numel() != job.numel or not dest.is_contiguous()):
            raise CkptavgError(f"{job.name}: shape {tuple(dest.shape)} where the checkpoints have {job.shape}")
    _Pipeline(plan, _IntoSink(destinations), device, piece_elements, None).run()
