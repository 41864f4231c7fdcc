"""The output shard writer: direct I/O in whole aligned blocks where the filesystem takes it, the page
cache where it does not, and in either case exactly the header and the tensors' bytes, back to back."""

from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import o_direct_set, refuse_direct_io
from safetensors.torch import load_file

from ckptavg.checkpoints.safetensors_header import safetensors_header
from ckptavg.engine import writer
from ckptavg.engine.plan import Shard, TensorJob
from ckptavg.engine.tensors import DIRECT_ALIGN


def _shard(sd: dict[str, torch.Tensor]) -> Shard:
    jobs = tuple(TensorJob(name=name, shape=tuple(t.shape), out_dtype=t.dtype, action="copy", sources=())
                 for name, t in sd.items())
    header = safetensors_header([(j.name, j.out_dtype, j.shape) for j in jobs])
    return Shard("model.safetensors", jobs, (header, *(b"" for _ in jobs)))


def _expected(sd: dict[str, torch.Tensor]) -> bytes:
    return safetensors_header([(k, t.dtype, tuple(t.shape)) for k, t in sd.items()]) + b"".join(
        t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in sd.values())


def _write(path, sd, pieces, **kw) -> writer.ShardFile:
    """Write `sd` through a ShardFile in pieces of `pieces` bytes, as numpy arrays and memoryviews."""
    f = writer.ShardFile(path, _shard(sd), **kw)
    try:
        for i, t in enumerate(sd.values()):
            raw = t.reshape(-1).view(torch.uint8).numpy()
            for a in range(0, raw.size, pieces):
                part = raw[a : a + pieces]
                f.write(part if i % 2 else memoryview(part))
        f.finish()
    except BaseException:
        f.abort()  # as the engine's writer stage does
        raise
    return f


def _block_aligned() -> dict[str, torch.Tensor]:
    """Tensors whose file (header included) is a whole number of direct-I/O blocks: no tail to pad."""
    for n in range(4096, 8192):
        sd = {"a": torch.arange(1000, dtype=torch.float16), "b": torch.zeros(n, dtype=torch.uint8)}
        if len(_expected(sd)) % DIRECT_ALIGN == 0:
            return sd
    raise AssertionError("no block-aligned size found")


def _takes_o_direct(folder) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("sizes", [(3, 5000, 1), (4096,), (1024, 1024, 1024, 1023), (70_001, 17), "aligned"])
@pytest.mark.parametrize("direct", [True, False])
def test_shard_bytes_are_the_header_and_the_tensors(tmp_path, sizes, direct):
    """Tails that are not whole blocks, a file of exactly whole blocks, a staging buffer smaller than a
    tensor (several flushes per write): the file holds exactly its bytes, and safetensors loads it."""
    g = torch.Generator().manual_seed(len(sizes))
    sd = _block_aligned() if sizes == "aligned" else {
        f"t{i}": torch.randn(n, generator=g).half() for i, n in enumerate(sizes)}
    out = tmp_path / "out.safetensors"
    f = _write(out, sd, pieces=1000, direct=direct, stage_bytes=2 * DIRECT_ALIGN)
    assert f.direct == (direct and _takes_o_direct(tmp_path))
    assert out.read_bytes() == _expected(sd)
    assert all(torch.equal(v, sd[k]) for k, v in load_file(out).items())


def test_direct_io_is_really_used(tmp_path):
    if not _takes_o_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem refuses O_DIRECT")
    sd = {"w": torch.arange(10_000, dtype=torch.float32)}
    f = writer.ShardFile(tmp_path / "x.safetensors", _shard(sd))
    try:
        assert f.direct and o_direct_set(f._fd)
    finally:
        f.abort()


def test_filesystems_that_refuse_direct_io_get_buffered_writes(tmp_path, monkeypatch):
    """Refused at open (EINVAL, as tmpfs before Linux 6.6 and some network filesystems answer) or at the
    first write (a device that wants another alignment): the same bytes go through the page cache."""
    sd = {"a": torch.randn(3000).half(), "b": torch.randn(777)}
    refuse_direct_io(monkeypatch, "open")
    f = _write(tmp_path / "open.safetensors", sd, pieces=512, stage_bytes=DIRECT_ALIGN)
    assert not f.direct and (tmp_path / "open.safetensors").read_bytes() == _expected(sd)
    monkeypatch.undo()

    refused = refuse_direct_io(monkeypatch, "write")
    f = _write(tmp_path / "write.safetensors", sd, pieces=512, stage_bytes=DIRECT_ALIGN)
    assert refused and not f.direct and (tmp_path / "write.safetensors").read_bytes() == _expected(sd)


def test_other_write_errors_name_the_file(tmp_path):
    """A full disk mid-write is the operating system's error with the output's path, as before."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        sd = {"w": torch.zeros(100_000, dtype=torch.float32)}
        with pytest.raises(OSError) as e:
            _write(where / "big.safetensors", sd, pieces=1 << 16)
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(where / "big.safetensors")
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_numpy_copy_does_not_alias_the_callers_buffer(tmp_path):
    """The writer copies what it is given before returning, so a pooled buffer can be reused at once."""
    sd = {"w": torch.arange(5000, dtype=torch.float32)}
    path = tmp_path / "w.safetensors"
    f = writer.ShardFile(path, _shard(sd))
    buf = sd["w"].clone().view(torch.uint8).numpy()
    f.write(buf)
    np.copyto(buf, 0)
    f.finish()
    assert torch.equal(load_file(path)["w"], sd["w"])


def test_only_this_hosts_dead_runs_temporaries_are_reaped(tmp_path):
    """Beside an output: a dead run's temporary on this host goes; a live one's stays, and so does every
    temporary named by another host (on a shared filesystem its pid means nothing here)."""
    import socket

    from ckptavg.layout import temporary_prefix

    final = tmp_path / "step3000"
    dead = subprocess.Popen(["true"])
    dead.wait()
    prefix = temporary_prefix(final)
    here, there = socket.gethostname(), "node-elsewhere-17"
    names = {"dead here": f"{prefix}{dead.pid}@{here}@0a1b2c3d", "live here": f"{prefix}{os.getpid()}@{here}@0a1b2c3d",
             "dead there": f"{prefix}{dead.pid}@{there}@0a1b2c3d", "live there": f"{prefix}1@{there}@old-0a1b2c3d",
             "dead, before hosts": f"{prefix}{dead.pid}-0a1b2c3d"}
    for name in names.values():
        (tmp_path / name).mkdir()
    with writer.OutputDir(final) as out:
        assert out.path.name.startswith(f"{prefix}{os.getpid()}@{here}@")
    left = {what for what, name in names.items() if (tmp_path / name).exists()}
    assert left == {"live here", "dead there", "live there"}
