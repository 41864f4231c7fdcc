"""Trajectories on an object store (a real S3 server, SeaweedFS on 127.0.0.1, tests/s3server.py), read by
URL with ranged reads and no local copy: each average is bit for bit the same as the average of local copies,
its manifest names the objects by URL with the sha256 of their bytes, and the credentials (taken the
standard way, from AWS_* variables) appear nowhere."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, load_reference
from s3server import BUCKET, KEY, SECRET, S3Server

from ckptavg.engine.average import average_checkpoints
from ckptavg.errors import InputError
from ckptavg.manifest import MANIFEST

DATA = Path(__file__).parent / "trainers" / "data"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The server, with three trainers' runs uploaded: OLMo-core 2-rank FSDP (DCP), transformers
    (safetensors) and Lightning (`torch.save` files); AWS_* variables pointing at it for the whole module."""
    s3fs = pytest.importorskip("s3fs")
    mp = pytest.MonkeyPatch()
    try:
        with S3Server(tmp_path_factory.mktemp("s3")) as server:
            mp.setenv("AWS_ACCESS_KEY_ID", KEY)
            mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
            mp.setenv("AWS_ENDPOINT_URL", server.endpoint)
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            for run in ("olmo-core-fsdp", "hf-trainer", "lightning"):
                fs.put(str(DATA / run), f"{BUCKET}/{run}", recursive=True)
            yield server
    except RuntimeError as e:
        if "no `weed`" in str(e):
            pytest.skip(str(e))
        raise
    finally:
        mp.undo()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.ckpt").is_file():  # Lightning's own file
        return torch.load(folder / "model.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in load_reference(folder).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("run,steps", [("olmo-core-fsdp", ("step4", "step6")),
                                       ("hf-trainer", ("checkpoint-4", "checkpoint-6")),
                                       ("lightning", ("epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"))])
def test_an_average_by_url_is_the_average_of_local_copies(store, tmp_path, monkeypatch, run, steps):
    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    out = average_checkpoints([f"s3://{BUCKET}/{run}/{s}" for s in steps], tmp_path / "remote", device="cpu")
    local = average_checkpoints([DATA / run / s for s in steps], tmp_path / "local", device="cpu")
    got, want = tensors(out), tensors(local)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    text = (out / MANIFEST).read_text()
    assert SECRET not in text and KEY not in text
    manifest = json.loads(text)
    assert [i["path"] for i in manifest["inputs"]][0].startswith(f"s3://{BUCKET}/{run}/{steps[0]}")
    for i in manifest["inputs"]:
        local = DATA / run / i["path"].split(f"s3://{BUCKET}/{run}/", 1)[1]
        for f in i["files"]:  # hashed from the ranged reads the average made
            file = local if local.is_file() else local / f["name"]
            assert f["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()


def test_ckptavg_trajectory_reads_a_run_on_the_store_as_its_trainer_laid_it_out(store, tmp_path):
    r = cli("trajectory", f"s3://{BUCKET}/olmo-core-fsdp", "--k", 2, "--nu", 2, "--interval", 2, "--start", 4,
            "--out", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    outs = sorted((tmp_path / "out").rglob(MANIFEST))
    assert [p.parent.name for p in outs] == ["step4", "step6"]
    shutil.rmtree(tmp_path / "local", ignore_errors=True)
    local = average_checkpoints([DATA / "olmo-core-fsdp" / s for s in ("step4", "step6")], tmp_path / "local",
                                device="cpu")
    got, want = tensors(outs[-1].parent), tensors(local)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_missing_object_or_a_bad_credential_is_one_line(store, tmp_path, monkeypatch):
    r = cli("average", f"s3://{BUCKET}/hf-trainer/checkpoint-9", f"s3://{BUCKET}/hf-trainer/checkpoint-6",
            "--out", tmp_path / "avg")
    assert r.exit_code == 2 and "Traceback" not in r.stderr and "checkpoint-9" in r.stderr, r.stderr
    import s3fs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()  # (fsspec keeps one filesystem per set of options, credentials and all)
    r = cli("average", f"s3://{BUCKET}/hf-trainer/checkpoint-4", f"s3://{BUCKET}/hf-trainer/checkpoint-6",
            "--out", tmp_path / "avg")
    assert r.exit_code == 2 and "access denied" in r.stderr and "not-the-secret" not in r.stderr, r.stderr
    assert not (tmp_path / "avg").exists()
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_study_source_on_the_store_with_its_own_storage_options(store, tmp_path, monkeypatch):
    """`[[sources]] local = "s3://..."` with `storage_options` (no AWS_* variables at all): the run's windows,
    each the same as from local copies, and the secret in none of the files the study wrote."""
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    s3fs.S3FileSystem.clear_instance_cache()
    study = tmp_path / "s.toml"
    study.write_text(f'out = "o"\n[steps]\ninterval = 2\nstart = 6\n'
                     f'[[sources]]\nlocal = "s3://{BUCKET}/hf-trainer"\n'
                     f'storage_options = {{ key = "{KEY}", secret = "{SECRET}", '
                     f'client_kwargs = {{ endpoint_url = "{store.endpoint}" }} }}\n'
                     '[[runs]]\nmethod = "lawa"\nk = 2\nnu = 2\n')
    try:
        r = cli("study", "run", study, "--root", tmp_path, "-q")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "o" / "hf-trainer" / "lawa-k2-nu2" / "step6"
    local = average_checkpoints([DATA / "hf-trainer" / s for s in ("checkpoint-4", "checkpoint-6")],
                                tmp_path / "local", device="cpu")
    got, want = tensors(out), tensors(local)
    assert all(torch.equal(got[k], want[k]) for k in want)
    written = [p for p in (tmp_path / "o").rglob("*") if p.is_file()]
    assert written and not any(SECRET.encode() in p.read_bytes() for p in written)


def test_an_object_overwritten_while_it_is_read_is_an_error_and_nothing_is_written(store, tmp_path):
    """The newest input's weights replaced on the store as soon as the average has read its first piece
    (from the average's own progress hook): the ETag before and after differ, and no output appears."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
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
        average_checkpoints([f"s3://{BUCKET}/changing/checkpoint-2", f"s3://{BUCKET}/changing/checkpoint-4"],
                            tmp_path / "avg", device="cpu", progress=progress, piece_elements=64)
    assert not (tmp_path / "avg").exists() and not list(tmp_path.glob(".avg*"))
