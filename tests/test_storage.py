"""The storage layer against a real S3 server (SeaweedFS on 127.0.0.1, tests/s3server.py) through s3fs:
listing, sizes and ETags, ranged reads into caller buffers byte for byte, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from s3server import BUCKET, SECRET, S3Server

from ckptavg.errors import InputError, OptionError
from ckptavg.storage import FileInfo, is_url
from ckptavg.storage import remote as remote_storage
from ckptavg.storage.remote import FsspecStorage


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("s3fs")
    try:
        with S3Server(tmp_path_factory.mktemp("s3")) as server:
            yield server
    except RuntimeError as e:
        if "no `weed`" in str(e):
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="module")
def run(s3):
    """run/step1/ and run/step2/ on the store, with files of odd sizes."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.options)
    blobs = {f"run/step{s}/model.safetensors": os.urandom(3 * 1024 * 1024 + 17 * s) for s in (1, 2)}
    blobs["run/step2/config.json"] = b"{}"
    for name, data in blobs.items():
        fs.pipe(f"{BUCKET}/{name}", data)
    return blobs


def test_urls_and_paths():
    assert is_url("s3://bucket/run") and is_url("gs://b/x") and is_url("memory://x")
    assert not is_url("runs/x") and not is_url("/abs/step1") and not is_url("file:///tmp/x")


def test_a_prefix_lists_and_each_object_has_its_size_and_etag(s3, run):
    storage, path = FsspecStorage.for_url(f"s3://{BUCKET}/run", s3.options)
    assert storage.list(path) == ["step1", "step2"]
    assert storage.list(f"{path}/step2") == ["config.json", "model.safetensors"]
    info = storage.info(f"{path}/step1/model.safetensors")
    assert isinstance(info, FileInfo) and info.size == len(run["run/step1/model.safetensors"])
    assert info.identity and info.identity != storage.info(f"{path}/step2/model.safetensors").identity


@pytest.mark.parametrize("offset,n", [(0, 1), (5, 4096), (1_000_003, 2_000_000), (3 * 1024 * 1024, 17)])
def test_ranged_reads_fill_the_callers_buffer_byte_for_byte(s3, run, monkeypatch, offset, n):
    monkeypatch.setattr(remote_storage, "CHUNK_BYTES", 1 << 20)  # several ranged GETs for the larger reads
    storage, path = FsspecStorage.for_url(f"s3://{BUCKET}/run/step1/model.safetensors", s3.options)
    buffer = bytearray(n)
    storage.read_into(path, offset, memoryview(buffer))
    assert bytes(buffer) == run["run/step1/model.safetensors"][offset : offset + n]


def test_store_errors_are_one_line_naming_the_url_and_never_the_secret(s3, run):
    storage, path = FsspecStorage.for_url(f"s3://{BUCKET}/run", s3.options)
    with pytest.raises(InputError, match=r"s3://runs/run/step9/model.safetensors: no such object") as e:
        storage.info(f"{path}/step9/model.safetensors")
    with pytest.raises(InputError, match="ends before byte") as e2:
        storage.read_into(f"{path}/step2/config.json", 1, memoryview(bytearray(8)))
    wrong = dict(s3.options, secret="not-the-secret")
    storage, path = FsspecStorage.for_url(f"s3://{BUCKET}/run/step1/model.safetensors", wrong)
    with pytest.raises(InputError, match="access denied") as e3:
        storage.info(path)
    assert all(SECRET not in str(x.value) and "not-the-secret" not in str(x.value) for x in (e, e2, e3))


def test_a_url_whose_filesystem_is_not_installed_says_which_extra_to_install(tmp_path):
    """s3fs made unimportable in a process of its own: the one line names the extra."""
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from ckptavg.storage.paths import location\n"
            "location('s3://bucket/run')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode != 0 and "needs s3fs: pip install 'ckptavg[s3]'" in r.stderr
    with pytest.raises(OptionError, match="no fsspec filesystem for nosuchscheme://"):
        FsspecStorage.for_url("nosuchscheme://x/y")
