"""Trajectories on object stores, read by URL with ranged reads and no local copy: a real S3 server
(SeaweedFS on 127.0.0.1, tests/s3server.py) and a real Google Cloud Storage one (gcp-storage-emulator,
tests/gcsserver.py). Each average is bit for bit the same as the average of local copies, its manifest names
the objects by URL with the sha256 of their bytes, and the credentials (taken the standard way, from AWS_*
variables, or a study file's storage_options) appear nowhere. What differs between stores (listing, ranged
reads, uploads, deletes, errors) runs on both; what is the same code whichever the store (faults, kills,
following) on S3, where a proxy can spoil its traffic."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import cli, load_reference
from s3server import BUCKET, KEY, SECRET, S3Server

from ckptavg.engine.average import average_checkpoints
from ckptavg.errors import InputError
from ckptavg.manifest import MANIFEST

DATA = Path(__file__).parent / "trainers" / "data"
RUNS = ("olmo-core-fsdp", "hf-trainer", "lightning")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@dataclass
class Bucket:
    """A bucket named BUCKET on a running server, with three trainers' runs uploaded: OLMo-core 2-rank
    FSDP (DCP), transformers (safetensors) and Lightning (`torch.save` files). `env`: the variables set
    (for the whole module) that tell a client where the store is and who asks; `options`: the same as
    fsspec storage options, for a study file."""

    scheme: str
    server: object
    env: dict
    options: dict

    def url(self, path: str) -> str:
        return f"{self.scheme}://{BUCKET}/{path}"

    def fs(self):
        """A new client (fsspec keeps one per set of options: one made before a change would be reused)."""
        import fsspec

        return fsspec.filesystem(self.scheme, skip_instance_cache=True,
                                 **({} if self.scheme == "s3" else {"token": "anon"}))

    def forget_clients(self) -> None:
        import fsspec

        fsspec.get_filesystem_class(self.scheme).clear_instance_cache()

    def etag(self, url: str) -> str:
        info = self.fs().info(url)
        return info.get("ETag") or info["etag"]


def _serve(scheme: str, server, env: dict, options: dict):
    mp = pytest.MonkeyPatch()
    try:
        with server:
            for name, value in env.items():
                mp.setenv(name, value)
            bucket = Bucket(scheme, server, env, options)
            for run in RUNS:
                bucket.fs().put(str(DATA / run), f"{BUCKET}/{run}", recursive=True)
            yield bucket
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("s3fs")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": server.endpoint}
    try:
        yield from _serve("s3", server, env, server.options)
    except RuntimeError as e:
        if "no `weed`" in str(e):
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    import os
    import sys

    from gcsserver import GCSFS_ENV, GCSServer

    for name, value in GCSFS_ENV.items():  # (read once, as gcsfs is imported)
        if "gcsfs" in sys.modules and os.environ.get(name) != value:
            pytest.skip(f"gcsfs was imported without {name}={value}")
        os.environ[name] = value
    pytest.importorskip("gcsfs")
    server = GCSServer(tmp_path_factory.mktemp("gcs"))
    try:
        yield from _serve("gs", server, {"STORAGE_EMULATOR_HOST": server.endpoint}, server.options)
    except RuntimeError as e:
        if "no `gcp-storage-emulator`" in str(e):
            pytest.skip(str(e))
        raise


@pytest.fixture(params=["s3", "gs"])
def bucket(request) -> Bucket:
    """Each store in turn, for what differs between them."""
    return request.getfixturevalue({"s3": "s3", "gs": "gcs"}[request.param])


@pytest.fixture
def store(s3) -> Bucket:
    """The S3 server, for what is the same code whichever the store."""
    return s3


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.ckpt").is_file():  # Lightning's own file
        return torch.load(folder / "model.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in load_reference(folder).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("run,steps", [("olmo-core-fsdp", ("step4", "step6")),
                                       ("hf-trainer", ("checkpoint-4", "checkpoint-6")),
                                       ("lightning", ("epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"))])
def test_an_average_by_url_is_the_average_of_local_copies(bucket, tmp_path, monkeypatch, run, steps):
    """...with no local copy: no file in the temporary folder throughout (checked as the first piece is
    written) and after."""
    import tempfile

    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    during = []

    def copies() -> list[Path]:  # (torch's compiler makes its cache folder there on import: not a copy)
        return [p for p in (tmp_path / "tmp").rglob("*") if p.is_file() and "torchinductor_root" not in p.parts]

    def progress(plan):
        return lambda n: during.append(copies())

    out = average_checkpoints([bucket.url(f"{run}/{s}") for s in steps], tmp_path / "remote", device="cpu",
                              progress=progress)
    assert during and not any(during) and not copies()
    local = average_checkpoints([DATA / run / s for s in steps], tmp_path / "local", device="cpu")
    got, want = tensors(out), tensors(local)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    text = (out / MANIFEST).read_text()
    assert SECRET not in text and KEY not in text
    manifest = json.loads(text)
    assert [i["path"] for i in manifest["inputs"]][0].startswith(bucket.url(f"{run}/{steps[0]}"))
    for i in manifest["inputs"]:
        local = DATA / run / i["path"].split(bucket.url(f"{run}/"), 1)[1]
        for f in i["files"]:  # hashed from the ranged reads the average made; the object's ETag as read
            file = local if local.is_file() else local / f["name"]
            assert f["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
            url = i["path"] if local.is_file() else f"{i['path']}/{f['name']}"
            assert f["etag"] == bucket.etag(url)


def test_ckptavg_trajectory_reads_a_run_on_the_store_as_its_trainer_laid_it_out(bucket, tmp_path):
    r = cli("trajectory", bucket.url("olmo-core-fsdp"), "--k", 2, "--nu", 2, "--interval", 2, "--start", 4,
            "--out", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    outs = sorted((tmp_path / "out").rglob(MANIFEST))
    assert [p.parent.name for p in outs] == ["step4", "step6"]
    shutil.rmtree(tmp_path / "local", ignore_errors=True)
    local = average_checkpoints([DATA / "olmo-core-fsdp" / s for s in ("step4", "step6")], tmp_path / "local",
                                device="cpu")
    got, want = tensors(outs[-1].parent), tensors(local)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_missing_object_is_one_line(bucket, tmp_path):
    r = cli("average", bucket.url("hf-trainer/checkpoint-9"), bucket.url("hf-trainer/checkpoint-6"),
            "--out", tmp_path / "avg")
    assert r.exit_code == 2 and "Traceback" not in r.stderr and "checkpoint-9" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "avg").exists()


def test_a_bad_credential_is_one_line_without_it(store, tmp_path, monkeypatch):
    """(The GCS emulator takes any credential: S3's are what is tested.)"""
    import s3fs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()  # (fsspec keeps one filesystem per set of options, credentials and all)
    r = cli("average", f"s3://{BUCKET}/hf-trainer/checkpoint-4", f"s3://{BUCKET}/hf-trainer/checkpoint-6",
            "--out", tmp_path / "avg")
    assert r.exit_code == 2 and "access denied" in r.stderr and "not-the-secret" not in r.stderr, r.stderr
    assert not (tmp_path / "avg").exists()
    s3fs.S3FileSystem.clear_instance_cache()


def _toml(value) -> str:
    """A value as TOML writes it inline (strings and tables of them are all a study file needs here)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def test_a_study_source_on_the_store_with_its_own_storage_options(bucket, tmp_path, monkeypatch):
    """`[[sources]] local = "s3://..."` (or gs://) with `storage_options` and none of the variables that
    name the store or its credentials: the run's windows, each the same as from local copies, and the
    secret in none of the files the study wrote."""
    for name in bucket.env:
        monkeypatch.delenv(name)
    bucket.forget_clients()
    study = tmp_path / "s.toml"
    study.write_text(f'out = "o"\n[steps]\ninterval = 2\nstart = 6\n'
                     f'[[sources]]\nlocal = "{bucket.url("hf-trainer")}"\n'
                     f'storage_options = {_toml(bucket.options)}\n'
                     '[[runs]]\nmethod = "lawa"\nk = 2\nnu = 2\n')
    try:
        r = cli("study", "run", study, "--root", tmp_path, "-q")
    finally:
        bucket.forget_clients()
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "o" / "hf-trainer" / "lawa-k2-nu2" / "step6"
    local = average_checkpoints([DATA / "hf-trainer" / s for s in ("checkpoint-4", "checkpoint-6")],
                                tmp_path / "local", device="cpu")
    got, want = tensors(out), tensors(local)
    assert all(torch.equal(got[k], want[k]) for k in want)
    written = [p for p in (tmp_path / "o").rglob("*") if p.is_file()]
    assert written and not any(SECRET.encode() in p.read_bytes() for p in written)


def test_an_object_overwritten_while_it_is_read_is_an_error_and_nothing_is_written(bucket, tmp_path):
    """The newest input's weights replaced on the store as soon as the average has read its first piece
    (from the average's own progress hook): the ETag before and after differ, and no output appears."""
    fs = bucket.fs()
    for s in ("checkpoint-2", "checkpoint-4"):
        fs.put(str(DATA / "hf-trainer" / s), f"{BUCKET}/changing/{s}", recursive=True)
    target = f"{BUCKET}/changing/checkpoint-4/model.safetensors"

    def progress(plan):
        def tick(n):
            if not tick.done:
                tick.done = True
                fs.pipe(target, (DATA / "hf-trainer" / "checkpoint-6" / "model.safetensors").read_bytes())
        tick.done = False
        return tick

    with pytest.raises(InputError, match="changed while it was being read"):
        average_checkpoints([bucket.url("changing/checkpoint-2"), bucket.url("changing/checkpoint-4")],
                            tmp_path / "avg", device="cpu", progress=progress, piece_elements=4096)
    assert not (tmp_path / "avg").exists() and not list(tmp_path.glob(".avg*"))


# -- outputs on the store ------------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _fetched(fs, prefix: str, dest: Path) -> Path:
    fs.get(f"{BUCKET}/{prefix}", str(dest), recursive=True)
    return dest


@pytest.mark.parametrize("run,steps", [("hf-trainer", ("checkpoint-4", "checkpoint-6")),
                                       ("olmo-core-fsdp", ("step4", "step6"))])
def test_an_average_put_on_the_store_is_the_local_average_with_its_manifest_last(bucket, tmp_path, run, steps):
    """From inputs on the store to an output on the store, in shards: every file byte for byte the local
    average's, and while the shards go up no reader takes the output for a finished one."""
    from ckptavg.manifest import is_finished, read_manifest

    fs = bucket.fs()
    url = bucket.url(f"outputs/{run}")
    seen = []

    def progress(plan):
        return lambda n: seen.append(is_finished(url))

    local = average_checkpoints([DATA / run / s for s in steps], tmp_path / "local", device="cpu", shard_bytes=30_000)
    out = average_checkpoints([bucket.url(f"{run}/{s}") for s in steps], url, device="cpu", shard_bytes=30_000,
                              progress=progress, piece_elements=256)
    assert str(out) == url and seen and not any(seen) and is_finished(url)
    back = _fetched(fs, f"outputs/{run}", tmp_path / "back")
    assert _files(back) == _files(local) and len(_files(back)) > 1
    manifest, want = read_manifest(url), read_manifest(local)
    assert manifest.output == want.output and manifest.weights == want.weights
    assert [[(f.name, f.size, f.sha256) for f in i.files] for i in manifest.inputs] == \
        [[(f.name, f.size, f.sha256) for f in i.files] for i in want.inputs]
    assert all(f.etag for i in manifest.inputs for f in i.files)
    assert not any(f.etag for i in want.inputs for f in i.files)
    assert not fs.exists(f"{BUCKET}/outputs/{run}/.ckptavg-writing")


def test_an_output_on_the_store_is_replaced_only_with_force(bucket, tmp_path):
    fs = bucket.fs()
    srcs = [DATA / "hf-trainer" / s for s in ("checkpoint-2", "checkpoint-4")]
    url = bucket.url("outputs/replaced")
    assert cli("average", *srcs, "--out", url, "-q", "--shard-size", "30KB").exit_code == 0
    r = cli("average", *srcs, "--out", url, "-q")
    assert r.exit_code == 2 and "--force" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # replaced by a one-shard output: the old shards and their index go, nothing of them is left
    r = cli("average", *srcs, "--out", url, "-q", "--force")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{BUCKET}/outputs/replaced")) == \
        sorted(["ckptavg.json", "model.safetensors", "config.json", "generation_config.json"])
    # objects that no ckptavg run is writing are never replaced without --force
    fs.pipe(f"{BUCKET}/outputs/theirs/notes.txt", b"a researcher's notes")
    r = cli("average", *srcs, "--out", bucket.url("outputs/theirs"), "-q")
    assert r.exit_code == 2 and "no ckptavg run is writing" in r.stderr, r.stderr
    assert fs.cat(f"{BUCKET}/outputs/theirs/notes.txt") == b"a researcher's notes"


def test_interpolations_between_objects_on_the_store_put_on_the_store(store, tmp_path):
    fs = store.fs()
    a, b = (f"s3://{BUCKET}/hf-trainer/{s}" for s in ("checkpoint-2", "checkpoint-6"))
    r = cli("interpolate", a, b, "--alphas", "0.25,1", "--out", f"s3://{BUCKET}/outputs/lmc", "-q")
    assert r.exit_code == 0, r.stderr
    local = DATA / "hf-trainer"
    for alpha in (0.25, 1):
        want = average_checkpoints([local / "checkpoint-2", local / "checkpoint-6"], tmp_path / f"local{alpha}",
                                   weights=[alpha, 1 - alpha], normalize=False, device="cpu")
        assert _files(_fetched(fs, f"outputs/lmc/alpha{alpha:g}", tmp_path / f"back{alpha}")) == _files(want)
    r = cli("interpolate", a, b, "--alphas", "0.25", "--out", f"s3://{BUCKET}/outputs/lmc")
    assert r.exit_code == 0 and "skipped" in r.stdout + r.stderr, r.stdout  # finished: its manifest is there


def test_a_failed_average_leaves_nothing_on_the_store(bucket, tmp_path):
    """An error after the first shard was put (raised from the progress hook): that shard, the upload in
    progress and the marker are all gone."""
    fs = bucket.fs()

    def progress(plan):
        def tick(n):
            tick.read += n
            if tick.read > 60_000:
                raise RuntimeError("stopped by the test")
        tick.read = 0
        return tick

    with pytest.raises(RuntimeError, match="stopped by the test"):
        average_checkpoints([DATA / "hf-trainer" / s for s in ("checkpoint-2", "checkpoint-4")],
                            bucket.url("outputs/failed"), device="cpu", shard_bytes=20_000, piece_elements=64,
                            progress=progress)
    assert [p for p in fs.find(f"{BUCKET}/outputs/failed") if fs.isfile(p)] == []
    out = average_checkpoints([DATA / "hf-trainer" / s for s in ("checkpoint-2", "checkpoint-4")],
                              bucket.url("outputs/failed"), device="cpu")  # (the next run, no --force)
    assert (out / MANIFEST).is_file()


def test_an_output_a_live_run_is_writing_is_left_to_it(store, tmp_path):
    """A marker whose writer may be alive (a live process of this host; another host's, put within STALE)
    is refused, exit 2, with nothing of it deleted; one whose writer is gone (a dead process here, another
    host's marker older than STALE) marks a killed run's leftovers, replaced without --force."""
    import socket
    import subprocess
    import sys

    from ckptavg.engine.upload import STALE
    from ckptavg.manifest import is_finished

    fs = store.fs()
    srcs = [DATA / "hf-trainer" / s for s in ("checkpoint-2", "checkpoint-4")]
    url, prefix = store.url("outputs/busy"), f"{BUCKET}/outputs/busy"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    here = socket.gethostname()
    try:
        for marker, alive in [({"pid": live.pid, "host": here}, True),
                              ({"pid": 1, "host": "another-host", "beat": time.time()}, True),
                              ({"pid": gone.pid, "host": here}, False),
                              ({"pid": 1, "host": "another-host", "beat": time.time() - STALE - 1}, False)]:
            fs.pipe(f"{prefix}/.ckptavg-writing", json.dumps(marker).encode())
            fs.pipe(f"{prefix}/model.safetensors", b"half of a live run's upload")
            r = cli("average", *srcs, "--out", url, "-q")
            if alive:
                assert r.exit_code == 2 and f"being written by process {marker['pid']}" in r.stderr, r.stderr
                assert fs.cat(f"{prefix}/model.safetensors") == b"half of a live run's upload"
            else:
                assert r.exit_code == 0 and is_finished(url), r.stderr
            fs.rm(prefix, recursive=True)
    finally:
        live.kill()


def test_a_writer_puts_its_marker_again_while_it_writes(store, tmp_path, monkeypatch):
    """(So that another host knows it for alive however long the output takes.)"""
    monkeypatch.setattr("ckptavg.engine.upload.HEARTBEAT", 0.1)
    fs = store.fs()
    marker = f"{BUCKET}/outputs/beating/.ckptavg-writing"
    beats = []

    def progress(plan):
        def tick(n):
            time.sleep(0.05)
            beats.append(json.loads(fs.cat(marker))["beat"])
        return tick

    average_checkpoints([DATA / "hf-trainer" / s for s in ("checkpoint-2", "checkpoint-4")],
                        store.url("outputs/beating"), device="cpu", piece_elements=4096, progress=progress)
    assert len(set(beats)) >= 3 and beats == sorted(beats) and not fs.exists(marker)


KILLED = """
import os, sys
from ckptavg.engine import upload
from ckptavg.engine.average import average_checkpoints

if sys.argv[1] == "before-manifest":  # every shard put, the manifest not yet
    upload.RemoteOutputDir.commit = lambda *a, **k: os._exit(9)
else:  # the second shard's upload under way
    complete, done = upload.RemoteShardFile._complete, []
    def second(self):
        done.append(1)
        if len(done) == 2:
            self._file.flush()  # (its parts so far sent)
            os._exit(9)
        complete(self)
    upload.RemoteShardFile._complete = second
average_checkpoints(sys.argv[2:4], sys.argv[4], device="cpu", shard_bytes=20_000)
"""


@pytest.mark.parametrize("when", ["mid-upload", "before-manifest"])
def test_a_killed_average_is_no_output_and_the_next_run_replaces_it(bucket, tmp_path, when):
    """A process killed (os._exit, no cleanup) mid-upload or with every shard put: no manifest, so no reader
    takes it for an output; the next run, without --force, writes the whole average."""
    import subprocess
    import sys

    from ckptavg.manifest import is_finished

    fs = bucket.fs()
    srcs = [str(DATA / "hf-trainer" / s) for s in ("checkpoint-2", "checkpoint-4")]
    url = bucket.url(f"outputs/killed-{when}")
    r = subprocess.run([sys.executable, "-c", KILLED, when, *srcs, url], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    left = fs.find(url)
    assert left and not is_finished(url) and any(p.endswith(".ckptavg-writing") for p in left)
    assert cli("average", *srcs, "--out", url, "-q", "--shard-size", "20KB").exit_code == 0
    local = average_checkpoints(srcs, tmp_path / "local", device="cpu", shard_bytes=20_000)
    assert _files(_fetched(fs, f"outputs/killed-{when}", tmp_path / "back")) == _files(local)


def test_a_trajectory_put_on_the_store_is_the_local_one_and_resumes(bucket, tmp_path):
    """`trajectory SOURCE --out URL`: every window's output on the store byte for byte the local run's, each
    process's run log beside them (an object put whole: a store has no appends), and a second run finds
    them finished and writes nothing."""
    args = ("--k", 2, "--nu", 2, "--interval", 2, "--start", 4, "-q")
    tree = bucket.url("trees/olmo")
    r = cli("trajectory", bucket.url("olmo-core-fsdp"), *args, "--out", tree)
    assert r.exit_code == 0, r.stderr
    assert cli("trajectory", DATA / "olmo-core-fsdp", *args, "--out", tmp_path / "local").exit_code == 0
    fs = bucket.fs()
    back = _fetched(fs, "trees/olmo", tmp_path / "back")
    for step in ("step4", "step6"):
        assert _files(back / "olmo-core-fsdp" / "lawa-k2-nu2" / step) == \
            _files(tmp_path / "local" / "olmo-core-fsdp" / "lawa-k2-nu2" / step)
    def actions(log: Path) -> list[str]:
        return [json.loads(line)["action"] for line in log.read_text().splitlines()]

    logs = list((back / "olmo-core-fsdp" / "lawa-k2-nu2").glob("ckptavg-run-*.jsonl"))
    assert len(logs) == 1 and actions(logs[0]).count("average") == 2
    assert actions(logs[0]) == actions(tmp_path / "local" / "olmo-core-fsdp" / "lawa-k2-nu2" / "ckptavg-run.jsonl")
    before = {p: fs.info(p)["size"] for p in fs.find(f"{BUCKET}/trees/olmo")}
    r = cli("trajectory", bucket.url("olmo-core-fsdp"), *args, "--out", tree)
    assert r.exit_code == 0 and "0 output(s) written" in r.stdout + r.stderr, r.stdout + r.stderr
    assert {p: fs.info(p)["size"] for p in fs.find(f"{BUCKET}/trees/olmo") if "ckptavg-run-" not in p} == \
        {p: n for p, n in before.items() if "ckptavg-run-" not in p}


@pytest.mark.parametrize("command", [["trajectory", "run", "--eval", "wikitext"], ["trajectory", "run", "--follow"],
                                     ["pythia", "--model", "1b", "--eval", "lambada_openai"]])
def test_scoring_or_following_refuse_a_store_for_their_tree(tmp_path, command):
    """Before anything is listed or fetched: scoring loads each output from a filesystem, a follower keeps
    steps under OUT."""
    r = cli(*command, "--out", "s3://bucket/out")
    assert r.exit_code == 2 and "writes to a filesystem" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()


def test_a_study_refuses_a_store_for_its_tree(tmp_path):
    study = tmp_path / "s.toml"
    study.write_text('out = "s3://bucket/out"\n[steps]\ninterval = 2\n[[sources]]\nlocal = "run"\n'
                     '[[runs]]\nmethod = "lawa"\nk = 2\nnu = 2\n')
    r = cli("study", "plan", study)
    assert r.exit_code == 2 and "a study (its results store, locks and job logs) writes to a filesystem" in r.stderr \
        and "Traceback" not in r.stderr, r.stderr


# -- faults ---------------------------------------------------------------------------------------------
@pytest.fixture
def proxied(store, monkeypatch):
    """A fault-injecting proxy in front of the server (tests/faultproxy.py); botocore's own retries off, so
    that what recovers from a fault is ckptavg's."""
    import s3fs
    from faultproxy import FaultProxy

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with FaultProxy(store.server.endpoint) as proxy:
        s3fs.S3FileSystem.clear_instance_cache()
        yield proxy
    s3fs.S3FileSystem.clear_instance_cache()


def _via(proxy, url: str, **config):
    from ckptavg.storage.paths import location

    return location(url, {"client_kwargs": {"endpoint_url": proxy.endpoint}, "config_kwargs": config})


def test_passing_faults_are_asked_again_and_the_average_is_exact(store, proxied, tmp_path):
    """503, throttling, 500, a body cut off halfway, a body that stalls past the read timeout: each ranged
    GET that met one is asked again, and the average is bit for bit the local one."""
    steps = ("checkpoint-4", "checkpoint-6")
    proxied.spoil("503", "cut", "slowdown", "stall", "500")
    srcs = [_via(proxied, f"s3://{BUCKET}/hf-trainer/{s}", read_timeout=1) for s in steps]
    out = average_checkpoints(srcs, tmp_path / "avg", device="cpu", piece_elements=1024)
    assert proxied.injected == {"503": 1, "cut": 1, "slowdown": 1, "stall": 1, "500": 1}
    local = average_checkpoints([DATA / "hf-trainer" / s for s in steps], tmp_path / "local", device="cpu")
    assert _files(out) == _files(local)


def test_a_slow_link_gives_the_same_average(store, proxied, tmp_path):
    proxied.rate = 2e6  # bytes per second
    steps = ("checkpoint-2", "checkpoint-4")
    out = average_checkpoints([_via(proxied, f"s3://{BUCKET}/hf-trainer/{s}") for s in steps], tmp_path / "avg",
                              device="cpu")
    local = average_checkpoints([DATA / "hf-trainer" / s for s in steps], tmp_path / "local", device="cpu")
    assert _files(out) == _files(local) and proxied.ranged_gets


def _restart_in_background(server, down_seconds: float) -> threading.Thread:
    server.__exit__()

    def up():
        time.sleep(down_seconds)
        server.__enter__()
    thread = threading.Thread(target=up)
    thread.start()
    return thread


def test_a_server_restarted_mid_run_is_waited_for(store, tmp_path):
    """The server stopped as the first piece is written and started again a second later: the reads in
    between are asked again until it answers, and the average is exact."""
    steps = ("checkpoint-4", "checkpoint-6")
    restarted = []

    def progress(plan):
        def tick(n):
            if not restarted:
                restarted.append(_restart_in_background(store.server, 1.0))
        return tick

    try:
        out = average_checkpoints([f"s3://{BUCKET}/hf-trainer/{s}" for s in steps], tmp_path / "avg",
                                  device="cpu", piece_elements=64, progress=progress)
    finally:
        restarted[0].join()
    local = average_checkpoints([DATA / "hf-trainer" / s for s in steps], tmp_path / "local", device="cpu")
    assert _files(out) == _files(local)


def test_a_server_gone_for_good_is_exit_3_and_nothing_is_written(store, tmp_path, monkeypatch):
    """Down for longer than ckptavg asks again (RETRIES): one line naming the object, an `IOFailure` (exit
    3, a run that stopped mid-way), and no output."""
    import s3fs

    from ckptavg.errors import IOFailure

    monkeypatch.setattr("ckptavg.storage.remote.RETRIES", 2)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # (botocore's own retries, the slow part of giving up)
    s3fs.S3FileSystem.clear_instance_cache()
    stopped = []

    def progress(plan):
        def tick(n):
            if not stopped:
                stopped.append(store.server.__exit__())
        return tick

    try:
        with pytest.raises(IOFailure, match=f"s3://{BUCKET}/hf-trainer/checkpoint-") as e:
            average_checkpoints([f"s3://{BUCKET}/hf-trainer/{s}" for s in ("checkpoint-4", "checkpoint-6")],
                                tmp_path / "avg", device="cpu", piece_elements=64, progress=progress)
    finally:
        store.server.__enter__()  # (up again for the tests after this one)
        s3fs.S3FileSystem.clear_instance_cache()
    assert e.value.exit_code == 3 and "\n" not in str(e.value) and SECRET not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_a_bucket_that_does_not_exist_is_one_line_before_any_work(bucket, tmp_path):
    r = cli("average", f"{bucket.scheme}://no-such-bucket/run/step1", f"{bucket.scheme}://no-such-bucket/run/step2",
            "--out", tmp_path / "avg")
    assert r.exit_code == 2 and "no-such-bucket" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "avg").exists()


def _follow(url: str, out: Path, *extra: str):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "ckptavg", "trajectory", url, "--follow", "--k", "3", "--nu", "2",
                             "--interval", "2", "--start", "6", "--until", "10", "--poll", "1s", "--out", str(out),
                             "-q", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_following_a_run_on_the_store_that_deletes_its_checkpoints(store, tmp_path):
    """A trainer on the store keeping its newest two steps, deleting the oldest before it saves the next:
    with a disk budget the follower keeps (downloads) what later windows need, and every window is the
    float64 mean of its members; without one it reads steps in place and keeps nothing."""
    from conftest import assert_matches, pythia_state_dict, reference_average, write_checkpoint

    fs = store.fs()
    local = tmp_path / "steps"
    for step in range(2, 12, 2):
        write_checkpoint(local / f"step{step}", pythia_state_dict(step, torch.float32), "safetensors")
    # without a budget, over a run whose trainer deletes nothing: read in place, nothing kept
    for step in (2, 4, 6, 8, 10):
        fs.put(str(local / f"step{step}"), f"{BUCKET}/done/step{step}", recursive=True)
    follower = _follow(f"s3://{BUCKET}/done", tmp_path / "in-place")
    stdout, stderr = follower.communicate(timeout=240)
    assert follower.returncode == 0, stderr
    assert not list((tmp_path / "in-place" / "done").glob(".ckptavg-kept/*"))
    for step in (6, 8, 10):
        assert_matches(tmp_path / "in-place" / "done" / "lawa-k3-nu2" / f"step{step}",
                       reference_average([local / f"step{s}" for s in (step - 4, step - 2, step)]), 0, torch.float64)

    out = tmp_path / "out"
    kept = out / "live" / ".ckptavg-kept"
    fs.put(str(local / "step2"), f"{BUCKET}/live/step2", recursive=True)
    follower = _follow(f"s3://{BUCKET}/live", out, "--disk-budget", "1GB")
    try:
        for step in (4, 6, 8, 10):
            deadline = time.time() + 120
            while not (kept / f"step{step - 2}").is_dir():  # the follower has the newest step kept
                assert follower.poll() is None and time.time() < deadline, follower.communicate()
                time.sleep(0.2)
            if step >= 6:
                fs.rm(f"{BUCKET}/live/step{step - 4}", recursive=True)  # the trainer's limit: two steps
            fs.put(str(local / f"step{step}"), f"{BUCKET}/live/step{step}", recursive=True)
        stdout, stderr = follower.communicate(timeout=240)
    finally:
        follower.kill()
    assert follower.returncode == 0 and "skipped" not in stderr, stderr
    outputs = out / "live" / "lawa-k3-nu2"
    assert sorted(p.name for p in outputs.glob("step*")) == ["step10", "step6", "step8"]
    for step in (6, 8, 10):
        assert_matches(outputs / f"step{step}", reference_average([local / f"step{s}" for s in (step - 4, step - 2,
                                                                                                   step)]),
                       0, torch.float64)
        manifest = json.loads((outputs / f"step{step}" / MANIFEST).read_text())
        assert {i["source"] for i in manifest["inputs"]} == {f"s3://{BUCKET}/live"}
    assert not list(kept.iterdir())  # every kept step released


@pytest.mark.slow
def test_ranks_put_one_average_on_the_store_and_a_rerun_keeps_their_finished_objects(store, tmp_path):
    """Each rank puts its own `.distcp` object, rank 0 the `.metadata` and the manifest last; a rank killed
    mid-upload leaves the others' finished objects, which the same command run again keeps."""
    import sys

    from test_ranks import KILLED_MID_WRITE, finish, launch

    members = [store.url(f"olmo-core-fsdp/{s}/model_and_optim") for s in ("step4", "step6")]
    url = store.url("ranks/avg")
    command = [sys.executable, "-m", "ckptavg", "average", *members, "--out", url, "-q", "--timeout", "3"]
    said = finish(launch(2, *command, cwd=tmp_path,
                         rank_args={1: [sys.executable, "-c", KILLED_MID_WRITE, *members, url]}))
    assert said[0][0] == 2 and "rank 1 of 2 has been silent" in said[0][1], said
    fs = store.fs()
    left = {p: fs.info(p)["LastModified"] for p in fs.find(f"{BUCKET}/ranks/avg") if p.endswith(".distcp")}
    assert left and not fs.exists(f"{BUCKET}/ranks/avg/{MANIFEST}")
    said = finish(launch(2, *command, cwd=tmp_path))
    assert [code for code, _ in said] == [0, 0], said
    assert {p: fs.info(p)["LastModified"] for p in left} == left  # kept, not put again
    fs.get(f"{BUCKET}/ranks/avg", str(tmp_path / "got"), recursive=True)
    written = json.loads((tmp_path / "got" / MANIFEST).read_text())["output"]["files"]
    assert sorted(p.name for p in (tmp_path / "got").rglob("*.distcp")) == sorted(
        Path(f["name"]).name for f in written) and len(written) >= 2
    local = average_checkpoints([DATA / "olmo-core-fsdp" / s / "model_and_optim" for s in ("step4", "step6")],
                                tmp_path / "local", device="cpu")
    got, want = tensors(tmp_path / "got"), tensors(local)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "got" / MANIFEST).read_text())["ranks"] == 2
