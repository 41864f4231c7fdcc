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
from conftest import assert_matches, pythia_state_dict, reference_average, write_checkpoint

from ckptavg.engine.average import average_checkpoints
from ckptavg.engine.tensors import DTYPE_NAMES
from ckptavg.hashing import FileHasher
from ckptavg.manifest import MANIFEST


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("seed", range(6))
def test_file_hasher_is_right_whatever_ranges_it_is_fed(tmp_path, seed):
    """Shuffled, overlapping, repeated and missing ranges, short and longer than the staging buffer: the
    digest is always the file's."""
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


def test_hashing_reads_no_input_twice(tmp_path, monkeypatch):
    """Hashing adds no reads of its own (headers and a few small reads aside): it hashes what the engine
    reads, whether through `read` calls or, as on a CPU, a mapping of the page cache."""
    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(3):
        sd = {f"layer{j}.weight": torch.randn(512, 1024, generator=g).half() for j in range(4)}
        inputs.append(write_checkpoint(tmp_path / f"step{i}", sd, "safetensors"))
    in_bytes = sum((f / "model.safetensors").stat().st_size for f in inputs)
    read = {}
    for hashed in (False, True):
        before = _read_bytes()
        out = average_checkpoints(inputs, tmp_path / f"avg-{hashed}", device="cpu", hash_inputs=hashed,
                                  piece_elements=1 << 16)
        read[hashed] = _read_bytes() - before
    assert read[True] - read[False] < 0.02 * in_bytes, read
    files = [r["files"][0] for r in json.loads((out / MANIFEST).read_text())["inputs"]]
    assert [f["sha256"] for f in files] == [sha256(f / "model.safetensors") for f in inputs]


def test_reader_maps_cached_files_and_reads_files_that_come_from_disk(tmp_path):
    """A file in the page cache is mapped; from its first range that is not, a file is read into the
    caller's buffer to the end, even where read-ahead has cached what follows. Both give its bytes."""
    from ckptavg.engine import tensors

    t = torch.arange(1 << 20, dtype=torch.float32)
    folder = write_checkpoint(tmp_path / "c", {"w": t}, "safetensors")
    path = folder / "model.safetensors"
    ref = tensors.open_checkpoint(folder).tensors["w"]
    n = 1 << 19
    out = torch.empty(n * 4, dtype=torch.uint8)

    def inside_out(x):
        return out.data_ptr() <= x.data_ptr() < out.data_ptr() + out.numel()

    def evict():  # out of the page cache, as after a reboot (pages still mapped stay)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    path.read_bytes()
    with tensors.TensorReader(map_files=True) as reader:
        first = reader.read(ref, 0, n, out)
        assert not inside_out(first) and torch.equal(first, t[:n])  # cached: mapped
        evict()
        second = reader.read(ref, n, n, out)
        assert inside_out(second) and torch.equal(second, t[n:])  # from disk: read
        path.read_bytes()
        assert inside_out(reader.read(ref, 0, n, out))  # cached again, but this file is read to the end
    with tensors.TensorReader(map_files=True) as reader:
        assert not inside_out(reader.read(ref, n, n, out))  # the next average maps it again
    with tensors.TensorReader() as reader:
        assert inside_out(reader.read(ref, 0, n, out))  # without map_files: always read
