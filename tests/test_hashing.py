"""How the engine reads its inputs (mapped from the page cache, or read when they come from disk), and
their sha256 computed from those same bytes: right whatever the order of reads, with no second read."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import struct

import pytest
import torch
from conftest import (
    assert_matches,
    cached_share_of,
    cli,
    evict,
    pythia_state_dict,
    reference_average,
    refuse_direct_io,
    write_checkpoint,
)

from ckptavg import hashing
from ckptavg.checkpoints.index import DTYPE_NAMES, TensorRef
from ckptavg.checkpoints.open import open_checkpoint
from ckptavg.engine import tensors
from ckptavg.engine.average import average_checkpoints, average_in_memory
from ckptavg.errors import CorruptCheckpointError
from ckptavg.hashing import FileHasher
from ckptavg.manifest import MANIFEST
from ckptavg.storage import pagecache
from ckptavg.trajectory.run import RunSpec, execute_run, plan_run
from ckptavg.trajectory.sources import LocalTrajectory


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("way", [0, 1], ids=["straight", "staged"])
@pytest.mark.parametrize("seed", range(6))
def test_file_hasher_is_right_whatever_ranges_it_is_fed(tmp_path, monkeypatch, seed, way):
    """Shuffled, overlapping, repeated and missing ranges, short and longer than the staging buffer, hashed
    where they lie or through the buffer: the digest is always the file's."""
    ways = hashing._Ways()
    ways.chosen = way
    monkeypatch.setattr(hashing, "_WAYS", ways)
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(1, 1_500_000))  # ranges above and below the staging size
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(rng.randrange(0, 40)))})
    ranges = list(itertools.pairwise(cuts))
    if seed % 2:
        rng.shuffle(ranges)
    ranges += [(a, min(len(data), a + rng.randrange(1, 5000))) for a, _ in rng.sample(ranges, len(ranges) // 3)]
    ranges = [r for r in ranges if rng.random() > 0.2]  # some never read: the hasher reads them
    hasher = FileHasher(path)
    for a, b in ranges:
        hasher.update(a, memoryview(data)[a:b])
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_process_hashes_each_way_then_keeps_the_faster():
    """Alternately until each way has TRIAL_BYTES, then the one with less CPU per byte, for good."""
    ways = hashing._Ways()
    mb = 1024 * 1024
    seen = []
    for _ in range(2 * hashing.TRIAL_BYTES // (8 * mb)):
        way = ways.next()
        seen.append(way)
        ways.record(way, 8 * mb, 0.004 if way == 1 else 0.005)  # through the buffer: 20% faster here
    assert seen[:4] == [0, 1, 0, 1] and seen.count(0) == seen.count(1)
    assert ways.chosen == 1 and ways.next() == 1
    ways.record(0, 10**9, 0.001)  # (the choice is made: later timings change nothing)
    assert ways.next() == 1


def write_reversed_safetensors(sd: dict[str, torch.Tensor], path) -> None:
    """A valid safetensors file laid out in the reverse of the order `save_file` uses, so that an
    engine reading in another checkpoint's order reads this one backwards."""
    names = sorted(sd, reverse=True)
    header, offset = {}, 0
    for name in names:
        n = sd[name].numel() * sd[name].element_size()
        header[name] = {"dtype": DTYPE_NAMES[sd[name].dtype], "shape": list(sd[name].shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            f.write(sd[name].reshape(-1).view(torch.uint8).numpy().tobytes())


def test_manifest_hashes_are_right_for_every_layout_and_order(ckpts, tmp_path, monkeypatch):
    """A sharded input, a `.bin` input, one read backwards, one given twice, tiny pieces: every file's
    recorded sha256 is its own, and the average is still the reference's."""
    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    backwards = write_checkpoint(tmp_path / "backwards", pythia_state_dict(7, torch.float16), "safetensors")
    write_reversed_safetensors(pythia_state_dict(7, torch.float16), backwards / "model.safetensors")
    inputs = [ckpts("float16", "safetensors-sharded")[0], ckpts("float16", "bin")[1], backwards,
              ckpts("float16", "safetensors")[2], backwards]
    out = average_checkpoints(inputs, tmp_path / "avg", device="cpu", piece_elements=300)
    assert_matches(out, reference_average(inputs), max_ulp=1)
    records = json.loads((out / MANIFEST).read_text())["inputs"]
    assert sum(len(r["files"]) for r in records) >= 6
    for folder, record in zip(inputs, records, strict=True):
        for f in record["files"]:
            assert (f["sha256"], f["sha256_source"]) == (sha256(folder / f["name"]), "computed"), f["name"]


def _read_bytes() -> int:
    """Bytes this process has read through system calls (page cache or disk alike)."""
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hashing_reads_no_input_twice(tmp_path, monkeypatch, fmt):
    """Hashing adds no reads of its own (headers and a few small reads aside): it hashes what the engine
    reads, whether through `read` calls or, as on a CPU, a mapping of the page cache; `.bin` files too,
    whose tensors are found at their byte offsets in the zip."""
    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(3):
        sd = {f"layer{j}.weight": torch.randn(512, 1024, generator=g).half() for j in range(4)}
        inputs.append(write_checkpoint(tmp_path / f"step{i}", sd, fmt))
    weights = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    in_bytes = sum((f / weights).stat().st_size for f in inputs)
    read = {}
    for hashed in (False, True):
        before = _read_bytes()
        out = average_checkpoints(inputs, tmp_path / f"avg-{hashed}", device="cpu", hash_inputs=hashed,
                                  piece_elements=1 << 16)
        read[hashed] = _read_bytes() - before
    assert read[True] - read[False] < 0.02 * in_bytes, read
    files = [r["files"][0] for r in json.loads((out / MANIFEST).read_text())["inputs"]]
    assert [f["sha256"] for f in files] == [sha256(f / weights) for f in inputs]


def cached(path, pos: int, nbytes: int) -> bool:
    return cached_share_of(path, pos, nbytes) == 1


def read_into(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the reader gave `x` in the caller's buffer `out` (read), not as a view of the file (mapped)."""
    return out.data_ptr() <= x.data_ptr() < out.data_ptr() + out.numel()


def test_asking_whether_a_range_is_cached_reads_none_of_it(tmp_path):
    """Every page must be cached for a range to count as cached, and asking brings none in: the ranges
    of a file that the next average of a sliding window reads are not taken for cached because this one
    asked about them."""
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(8 << 20))
    evict(path)
    for pos, n in [(0, 1), (5000, 1 << 20), ((8 << 20) - 10, 10)]:
        assert not cached(path, pos, n) and not cached(path, pos, n)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: exactly these two MiB come in
    os.pread(fd, 1 << 20, 1 << 20)
    os.pread(fd, 1 << 20, 6 << 20)
    os.close(fd)
    assert cached(path, (1 << 20) + 100, 1000) and cached(path, 6 << 20, 1 << 20)
    assert not cached(path, (2 << 20) - 100, (4 << 20) + 200)  # its first and last pages are, not all between


def test_reader_maps_cached_files_and_reads_files_that_come_from_disk(tmp_path):
    """A file in the page cache is mapped; from its first range that is not, a file is read into the
    caller's buffer to the end, even where read-ahead has cached what follows. Both give its bytes."""
    t = torch.arange(1 << 20, dtype=torch.float32)
    folder = write_checkpoint(tmp_path / "c", {"w": t}, "safetensors")
    path = folder / "model.safetensors"
    ref = open_checkpoint(folder).tensors["w"]
    n = 1 << 19
    out = torch.empty(n * 4, dtype=torch.uint8)

    path.read_bytes()
    with tensors.TensorReader(map_files=True) as reader:
        first = reader.read(ref, 0, n, out)
        assert not read_into(first, out) and torch.equal(first, t[:n])  # cached: mapped
        del first  # unmapped: a mapped page (and the large folio it is part of) cannot be evicted
        evict(path)
        second = reader.read(ref, n, n, out)
        assert read_into(second, out) and torch.equal(second, t[n:])  # from disk: read
        path.read_bytes()
        assert read_into(reader.read(ref, 0, n, out), out)  # cached again, but this file is read to the end
    with tensors.TensorReader(map_files=True) as reader:
        assert not read_into(reader.read(ref, n, n, out), out)  # the next average maps it again
    with tensors.TensorReader() as reader:
        assert read_into(reader.read(ref, 0, n, out), out)  # without map_files: always read


def test_a_range_missing_a_few_pages_is_mapped_as_cached(tmp_path):
    """A warm file that lost a few pages (the kernel takes some back here and there, within seconds of a
    read) is still mapped, the missing pages faulted in, not read from disk from there on; a file whose
    range is mostly gone is read from disk from there on."""
    t = torch.arange(1 << 20, dtype=torch.float32)
    n = 1 << 19  # 2 MiB: 512 pages
    out = torch.empty(n * 4 + tensors.DIRECT_SLACK, dtype=torch.uint8)
    page = os.sysconf("SC_PAGE_SIZE")

    def cached_but(name, missing):
        """A checkpoint of `t` evicted, then read back a page at a time without read-ahead (in pages, not in
        the large folios read-ahead caches, which go whole) but for the pages of its data in `missing`."""
        folder = write_checkpoint(tmp_path / name, {"w": t}, "safetensors")
        path, ref = folder / "model.safetensors", open_checkpoint(folder).tensors["w"]
        evict(path)
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for i in range(t.numel() * 4 // page):
            if i not in missing:
                os.pread(fd, page, ref.offset // page * page + i * page)
        shares = [pagecache.cached_share(fd, ref.offset + a * 4, n * 4) for a in (0, n)]
        os.close(fd)
        return ref, shares

    ref, shares = cached_but("holes", {*range(100, 108), *range(600, 608)})  # 8 pages of each range
    assert all(pagecache.MOSTLY_CACHED < s < 1 for s in shares)
    with tensors.TensorReader(map_files=True) as reader:
        for start in (0, n):
            got = reader.read(ref, start, n, out)
            assert not read_into(got, out) and torch.equal(got, t[start : start + n])  # mapped

    ref, shares = cached_but("gone", {*range(0, 400), *range(512, 1024)})  # a fifth of the first range
    assert 0 < shares[0] < pagecache.MOSTLY_CACHED and shares[1] < 0.01
    with tensors.TensorReader(map_files=True) as reader:
        for start in (0, n):
            got = reader.read(ref, start, n, out)
            assert read_into(got, out) and torch.equal(got, t[start : start + n])  # from disk: read


def test_bin_tensors_are_indexed_at_their_byte_offsets(tmp_path):
    """A zip `.bin` tensor's bytes lie at its reference's offset, as torch.load gives them; a strided view
    (no bytes of its own in order) has none and is still read right."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 32, generator=g)
    sd = {"empty": torch.empty(0), "w": torch.randn(1000, generator=g).half(), "b": torch.randn(7, generator=g),
          "base": base,
          "row": base[5], "t": torch.randn(16, 8, generator=g).t(), "steps": torch.arange(5)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ckpt = open_checkpoint(tmp_path)
    raw = (tmp_path / "pytorch_model.bin").read_bytes()
    for name, ref in ckpt.tensors.items():
        if name == "t":
            assert ref.offset is None
            continue
        want = sd[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert raw[ref.offset : ref.offset + ref.nbytes] == want, name
    out = torch.empty(4096, dtype=torch.uint8)
    with tensors.TensorReader(map_files=True) as reader:
        for name, ref in ckpt.tensors.items():
            assert torch.equal(reader.read(ref, 0, ref.numel, out).clone(), sd[name].reshape(-1)), name


def _odd_file(tmp_path):
    """A tensor whose data starts and ends off block boundaries (the file's length is no whole number of
    4 KiB blocks), evicted from the page cache."""
    t = torch.randn(1_000_003, generator=torch.Generator().manual_seed(3)).half()
    folder = write_checkpoint(tmp_path / "c", {"w": t}, "safetensors")
    path = folder / "model.safetensors"
    ref = open_checkpoint(folder).tensors["w"]
    assert ref.offset % tensors.DIRECT_ALIGN and path.stat().st_size % tensors.DIRECT_ALIGN
    evict(path)
    return t, path, ref


@pytest.mark.parametrize("shift", [0, 1, 4095])
def test_files_from_disk_are_read_direct_and_stay_out_of_the_page_cache(tmp_path, shift):
    """Ranges at any offset, the last one ending inside the file's last block, into buffers at any
    address: the bytes are the file's, and reading them left them out of the page cache (read-ahead
    through the cache would have cached the ranges that follow)."""
    t, path, ref = _odd_file(tmp_path)
    n = 333_331
    size = n * 2 + tensors.DIRECT_SLACK
    out = torch.empty(size + shift, dtype=torch.uint8)[shift:]
    with tensors.TensorReader(map_files=True) as reader:
        for start in range(0, t.numel(), n):
            got = reader.read(ref, start, min(n, t.numel() - start), out)
            assert out.data_ptr() <= got.data_ptr() < out.data_ptr() + size
            assert torch.equal(got, t[start : start + n])
            later = ref.offset + (start + n) * 2
            if later + 8192 < path.stat().st_size:
                assert not cached(path, later, 8192)


@pytest.mark.parametrize("path_taken", ["mapped", "direct", "through the cache"])
def test_a_range_at_any_byte_offset_is_read_as_its_elements(tmp_path, path_taken):
    """A DCP record or a `.bin` member may put a float32 tensor at an odd byte offset of its file: each
    read path gives its elements all the same (as a tensor on the bytes where they landed)."""
    t = torch.randn(100_003, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "odd.bin"
    path.write_bytes(b"xyz" + t.numpy().tobytes() + b"tail")
    ref = TensorRef("w", torch.float32, tuple(t.shape), path, 3)
    out = torch.empty(t.numel() * 4 + tensors.DIRECT_SLACK, dtype=torch.uint8)
    if path_taken == "direct":
        evict(path)
    else:
        path.read_bytes()
    keep = [path] if path_taken == "through the cache" else []
    with tensors.TensorReader(map_files=True, keep_cached=keep) as reader:
        for start in (0, 1, 50_000):
            got = reader.read(ref, start, 7_001, out)
            assert got.dtype == torch.float32 and torch.equal(got, t[start : start + 7_001])
        assert reader.read(ref, 5, 0, out).numel() == 0


def test_files_kept_for_a_later_average_are_read_through_the_page_cache(tmp_path):
    """Read into the buffer (not mapped, which would fault the file in from disk page by page), and
    left in the page cache for the average that reads them next."""
    t, path, ref = _odd_file(tmp_path)
    out = torch.empty(t.numel() * 2 + tensors.DIRECT_SLACK, dtype=torch.uint8)
    with tensors.TensorReader(map_files=True, keep_cached=[path]) as reader:
        for start in range(0, t.numel(), 300_000):
            got = reader.read(ref, start, min(300_000, t.numel() - start), out)
            assert read_into(got, out)
            assert torch.equal(got, t[start : start + 300_000])
    assert cached(path, ref.offset, ref.nbytes)


def test_direct_reads_refused_by_the_filesystem_go_through_the_page_cache(tmp_path, monkeypatch):
    """Refused at open (EINVAL: tmpfs before Linux 6.6, some network filesystems) or at the first read (a
    device that wants another alignment): the same bytes, read through the cache."""
    t, path, ref = _odd_file(tmp_path)
    out = torch.empty(t.numel() * 2 + tensors.DIRECT_SLACK, dtype=torch.uint8)
    refuse_direct_io(monkeypatch, "open")
    with tensors.TensorReader(map_files=True) as reader:
        assert torch.equal(reader.read(ref, 0, t.numel(), out), t)
    assert cached(path, ref.offset, ref.nbytes)
    monkeypatch.undo()

    evict(path)
    refused = refuse_direct_io(monkeypatch, "preadv")
    with tensors.TensorReader(map_files=True) as reader:
        assert torch.equal(reader.read(ref, 0, 1000, out), t[:1000])
        assert torch.equal(reader.read(ref, 1000, t.numel() - 1000, out), t[1000:])
    assert len(refused) == 1


def test_a_file_that_shrinks_while_read_from_disk_is_named(tmp_path):
    t, path, ref = _odd_file(tmp_path)
    out = torch.empty(t.numel() * 2 + tensors.DIRECT_SLACK, dtype=torch.uint8)
    os.truncate(path, path.stat().st_size - 5000)
    with tensors.TensorReader(map_files=True) as reader, pytest.raises(CorruptCheckpointError, match="shrank"):
        reader.read(ref, 0, t.numel(), out)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_averages_of_inputs_from_disk_are_the_reference(tmp_path, monkeypatch, device):
    """Every input out of the page cache (safetensors and `.bin`, single and sharded), pieces that cut
    tensors off block boundaries, hashed: the average and every recorded sha256 are right, and the
    inputs were read past the page cache (on a GPU, into the pinned buffers bound for it)."""
    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(5)
    inputs = [write_checkpoint(tmp_path / f"step{i}", {"a": torch.randn(1_000_003, generator=g).half(),
                                                       "b": torch.randn(777, generator=g).half(),
                                                       "c": torch.randn(1_500_001, generator=g).half()},
                               ("bin-sharded", "safetensors", "safetensors-sharded", "bin")[i])
              for i in range(4)]
    files = [f for folder in inputs for f in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])]
    for f in files:
        evict(f)
    out = average_checkpoints(inputs, tmp_path / "avg", device=device, piece_elements=99_999)
    assert not cached(files[-1], files[-1].stat().st_size // 2, 8192)
    assert_matches(out, reference_average(inputs), max_ulp=1)
    recorded = [f["sha256"] for r in json.loads((out / MANIFEST).read_text())["inputs"] for f in r["files"]]
    assert sorted(recorded) == sorted(sha256(f) for f in files)


@pytest.mark.parametrize("in_memory", [False, True], ids=["written", "in-memory"])
def test_a_sliding_window_reads_the_checkpoints_it_shares_through_the_page_cache(tmp_path, in_memory):
    """Windows {1, 2}, {2, 3}, {3, 4} over a cold trajectory: a checkpoint that a later window reads too
    is read through the page cache, for that window to find it there; one that no later window reads is
    read past it. The averages are the reference's either way, written or made in memory (as a study
    that scores as it goes makes them)."""
    g = torch.Generator().manual_seed(11)
    root = tmp_path / "run"
    for step in (1, 2, 3, 4):
        write_checkpoint(root / f"step{step}", {"w": torch.randn(8_000_003, generator=g).half()}, "safetensors")
    files = {step: root / f"step{step}" / "model.safetensors" for step in (1, 2, 3, 4)}
    for f in files.values():
        evict(f)
    if in_memory:
        source, made = LocalTrajectory(root), {}

        def average(job, folders, reread):
            made[job.window.step] = average_in_memory(folders, weights=job.window.weights, device="cpu",
                                                      reread=reread)

        execute_run(source, plan_run(source, RunSpec("lawa", 2, 1, 1, 2, 4), tmp_path / "out"), in_memory=average)
    else:
        r = cli("trajectory", root, "--k", 2, "--nu", 1, "--interval", 1, "--out", tmp_path / "out", "-q")
        assert r.exit_code == 0, r.output
        made = {step: tmp_path / "out" / "run" / "lawa-k2-nu1" / f"step{step}" for step in (2, 3, 4)}
    # between the blocks the duplicate check samples (at eighths of each file)
    assert {s: cached(f, f.stat().st_size * 5 // 16, 8192) for s, f in files.items()} == {
        1: False, 2: True, 3: True, 4: False}
    assert sorted(made) == [2, 3, 4]
    for step, out in made.items():
        assert_matches(out, reference_average([root / f"step{step - 1}", root / f"step{step}"]), max_ulp=1)


def test_shared_checkpoints_are_kept_in_the_cache_only_where_they_fit(tmp_path):
    """In half the memory available (default: the kernel's MemAvailable); else they are read past it."""
    from ckptavg.engine.pipeline import _worth_caching

    files = [tmp_path / "a", tmp_path / "b"]
    for f, n in zip(files, (3000, 1000), strict=True):
        f.write_bytes(b"x" * n)
    assert list(_worth_caching(files, available=8000)) == files
    assert list(_worth_caching(files, available=7999)) == []
    assert list(_worth_caching(files)) == files  # 4 kB fit in any machine's memory
