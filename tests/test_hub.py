"""Trajectories from the Hub: `ckptavg pythia` and `ckptavg trajectory ORG/NAME` against the test Hub server.

The CLI runs in a subprocess, because huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when
it is imported. The served repo is laid out like the real Pythia repos: step branches, some with
sharded `.bin` plus index and the old generation's buffers, some with a `model.safetensors` that
lacks them (so windows mix generations, newest-with and newest-without), a `main` equal to the last
step, and one bad branch (step6000) serving step5000's files byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_loads_in_transformers,
    assert_matches,
    char_tokenizer,
    load_reference,
    pythia_state_dict,
    recursive_ema,
    reference_average,
    write_checkpoint,
)
from conftest import (
    hub_cli as ckptavg,
)
from hubserver import HubServer

pytestmark = pytest.mark.slow  # a ckptavg process per test
REPO = "EleutherAI/pythia-70m-deduped"  # the catalogue's name for --model 70m; the content is tiny
STEPS = list(range(1000, 9000, 1000))
DUPLICATE = {6000: 5000}  # step6000 serves step5000's files
# transformers-4.24 `.bin` shards with the buffers; the others are safetensors without them. The window at
# 3000 mixes both with the newest holding them, the one at 5000 with the newest lacking them.
OLD_GENERATION = {1000, 3000, 4000, 8000}
LAWA = ("--k", "3", "--nu", "1000", "--interval", "2000", "--start", "3000", "--end", "8000")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubrepo")
    folders = {}
    for i, step in enumerate(STEPS):
        folder = root / f"step{step}"
        if step in DUPLICATE:
            shutil.copytree(folders[DUPLICATE[step]], folder)
        else:
            old = step in OLD_GENERATION
            write_checkpoint(folder, pythia_state_dict(i, torch.float16, buffers=old),
                             "bin-sharded" if old else "safetensors")
            char_tokenizer().save_pretrained(folder)
        folders[step] = folder
    server = HubServer()
    for step, folder in folders.items():
        server.add_branch(REPO, f"step{step}", folder)
    server.add_branch(REPO, "main", folders[STEPS[-1]])
    lacking = pythia_state_dict(0, torch.float16, buffers=False)
    del lacking["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"]
    bad = write_checkpoint(root / "bad", lacking, "safetensors")
    for step in (1000, 2000):
        server.add_branch("someone/bad-run", f"ckpt-{step}", folders[step])
    server.add_branch("someone/bad-run", "ckpt-3000", bad)  # a tensor set that does not match
    server.start()
    server.folders = folders
    yield server
    server.stop()


def content_gets(hub: HubServer) -> Counter:
    """GETs per distinct file content: the Hub cache stores equal files once, so each should be 1."""
    by_content: Counter = Counter()
    for (_, branch, name), n in hub.gets.items():
        folder = hub.repos[REPO][branch]
        by_content[hashlib.sha256((folder / name).read_bytes()).hexdigest()] += n
    return by_content


def cached_files(home: Path) -> list[Path]:
    """Snapshot entries and blobs left in the Hub cache for REPO."""
    repo = home / "hf" / "hub" / ("models--" + REPO.replace("/", "--"))
    return [p for sub in ("snapshots", "blobs") for p in (repo / sub).rglob("*") if not p.is_dir()]


def test_pythia_lawa_from_the_hub(hub, tmp_path):
    hub.gets.clear()
    size = sum(f.stat().st_size for f in hub.folders[1000].iterdir())
    budget = str(6 * size)  # three revisions and one output, with room for the shard sizes to differ
    r = ckptavg(hub, tmp_path, "pythia", "--model", "70m", *LAWA, "--out", str(tmp_path / "out"),
                "--disk-budget", budget, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    base = tmp_path / "out" / "pythia-70m-deduped" / "lawa-k3-nu1000"
    for t in (3000, 5000, 7000):
        members = [hub.folders[s] for s in (t - 2000, t - 1000, t)]
        assert_matches(base / f"step{t}", reference_average(members), max_ulp=1)
        manifest = json.loads((base / f"step{t}" / "ckptavg.json").read_text())
        assert [i["revision"] for i in manifest["inputs"]] == [f"step{s}" for s in (t - 2000, t - 1000, t)]
        assert {i["commit"] for i in manifest["inputs"]} == {hub.commit(REPO, f"step{s}")
                                                            for s in (t - 2000, t - 1000, t)}
    # every needed revision fetched, no file of any revision twice; step6000's weights are step5000's,
    # which were still in the cache, so they cost no GET at all
    needed = {hashlib.sha256(f.read_bytes()).hexdigest()
              for s in range(1000, 8000, 1000) for f in hub.folders[s].iterdir()}
    assert set(content_gets(hub)) == needed and set(hub.gets.values()) == {1}
    assert {branch for _, branch, _ in hub.gets} == {f"step{s}" for s in range(1000, 8000, 1000)} - {"step6000"}
    # the bad branch is reported before anything is fetched; main == last step is not
    assert "step5000, step6000 share weights byte for byte" in " ".join(r.stderr.split())
    assert "main" not in r.stderr.split("share weights")[0]
    # downloads were deleted after their last window, and the disk stayed within the budget
    log = [json.loads(line) for line in (base / "ckptavg-run.jsonl").read_text().splitlines()]
    assert max(e["source_disk"] for e in log) <= int(budget)
    assert [e["action"] for e in log].count("evict") == 7 and log[-1]["source_disk"] == 0
    assert cached_files(tmp_path) == []

    assert_loads_in_transformers(base / "step3000")  # newest (a `.bin` revision) with buffers
    assert_loads_in_transformers(base / "step5000")  # newest (a safetensors revision) without them
    assert "gpt_neox.layers.0.attention.bias" in load_reference(base / "step3000")
    assert "gpt_neox.layers.0.attention.bias" not in load_reference(base / "step5000")


def test_disk_budget_too_small_is_refused_before_download(hub, tmp_path):
    hub.gets.clear()
    r = ckptavg(hub, tmp_path, "pythia", "--model", "70m", *LAWA, "--out", str(tmp_path / "out"),
                "--disk-budget", "1000")
    assert r.returncode == 2 and "cannot hold one window" in r.stderr and "Traceback" not in r.stderr
    assert not hub.gets and not (tmp_path / "out").exists()


def test_killed_run_resumes_without_redoing_finished_windows(hub, tmp_path):
    hub.gets.clear()
    hub.stall, hub.release = ("step7000", "model.safetensors"), type(hub.release)()
    hub.stalled.clear()
    out = tmp_path / "out"
    proc = ckptavg(hub, tmp_path, "pythia", "--model", "70m", *LAWA, "--out", str(out), "--device", "cpu",
                   wait=False)
    try:
        assert hub.stalled.wait(60), "the run never reached step7000"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        hub.stall = None
        hub.release.set()
    base = out / "pythia-70m-deduped" / "lawa-k3-nu1000"
    assert sorted(p.name for p in base.glob("step*")) == ["step3000", "step5000"]
    stamps = {t: (base / f"step{t}" / "ckptavg.json").stat().st_mtime_ns for t in (3000, 5000)}
    before = Counter(hub.gets)
    r = ckptavg(hub, tmp_path, "pythia", "--model", "70m", *LAWA, "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "1 window(s) to average (2 already finished)" in " ".join(r.stdout.split())
    assert {t: (base / f"step{t}" / "ckptavg.json").stat().st_mtime_ns for t in (3000, 5000)} == stamps
    assert_matches(base / "step7000", reference_average([hub.folders[s] for s in (5000, 6000, 7000)]), max_ulp=1)
    again = hub.gets - before
    assert {branch for _, branch, _ in again} <= {"step6000", "step7000"}  # step5000 came from the cache
    assert [p.name for p in cached_files(tmp_path)] == []


def test_trajectory_from_a_hub_repo_with_ema_then_offline(hub, tmp_path):
    args = ("--steps-from-branches", r"step(\d+)", "--method", "ema", "--ema-alpha", "0.5", "--k", "2",
            "--nu", "1000", "--interval", "1000", "--start", "2000", "--end", "5000", "--device", "cpu", "-q")
    r = ckptavg(hub, tmp_path, "trajectory", REPO, *args, "--out", str(tmp_path / "out"), "--keep-downloads")
    assert r.returncode == 0, r.stderr
    base = tmp_path / "out" / "pythia-70m-deduped" / "ema-alpha0.5-k2-nu1000"
    for t in (2000, 5000):
        expected = recursive_ema([hub.folders[s] for s in range(1000, t + 1, 1000)], 0.5)
        got = load_reference(base / f"step{t}")
        for name, ref in expected.items():
            torch.testing.assert_close(got[name].double(), ref.double(), rtol=2e-3, atol=1e-6)
    # --keep-downloads left them in the cache, so the same run works with the Hub out of reach
    r = ckptavg(hub, tmp_path, "trajectory", REPO, *args, "--out", str(tmp_path / "again"), offline=True,
                endpoint="http://127.0.0.1:9")
    assert r.returncode == 0, r.stderr
    for t in (2000, 5000):  # the same bytes, from the cache alone
        online, offline = (load_reference(root / base.relative_to(tmp_path / "out") / f"step{t}")
                           for root in (tmp_path / "out", tmp_path / "again"))
        assert online.keys() == offline.keys() and all(torch.equal(online[k], offline[k]) for k in online)


@pytest.mark.parametrize("case, message", [
    ("unknown-repo", "no such model repo"),
    ("no-network", "cannot reach http://127.0.0.1:9"),
    ("offline-empty-cache", "HF_HUB_OFFLINE is set and EleutherAI/pythia-70m-deduped is not in the cache"),
    ("missing-revision", "window at step 3000 needs step(s) 0, 1500, which the trajectory does not have"),
    ("mismatch", "ckpt-3000"),
    ("unknown-size", "unknown Pythia size '5b'"),
])
def test_hub_errors_are_one_line(hub, tmp_path, case, message):
    out = ("--out", str(tmp_path / "out"), "-q")
    if case == "unknown-repo":
        r = ckptavg(hub, tmp_path, "trajectory", "nobody/nothing", *out)
    elif case == "no-network":
        r = ckptavg(hub, tmp_path, "pythia", "--model", "70m", *LAWA, *out, endpoint="http://127.0.0.1:9")
    elif case == "offline-empty-cache":
        r = ckptavg(hub, tmp_path, "pythia", "--model", "70m", *LAWA, *out, offline=True)
    elif case == "missing-revision":
        r = ckptavg(hub, tmp_path, "trajectory", REPO, "--k", "3", "--nu", "1500", "--start", "3000", *out)
    elif case == "mismatch":
        r = ckptavg(hub, tmp_path, "trajectory", "someone/bad-run", "--steps-from", r"ckpt-(\d+)", "--k", "3",
                    "--nu", "1000", "--start", "3000", *out)
    else:
        r = ckptavg(hub, tmp_path, "pythia", "--model", "5b", *out)
    assert r.returncode == 2, r.stderr
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert not any((tmp_path / "out").rglob("ckptavg.json"))


def test_study_scores_originals_while_on_disk_and_eval_fetches_them_again(hub, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the cat sat", "on the mat today")))
    score = ("--ppl-task", f"tiny={docs}", "--device", "cpu", "-q")
    out, db = tmp_path / "out", tmp_path / "a.sqlite"
    hub.gets.clear()
    r = ckptavg(hub, tmp_path, "pythia", "--model", "70m", *LAWA, "--out", str(out), "--eval", "tiny", "--results",
                str(db), *score)
    assert r.returncode == 0, r.stderr
    import sqlite3

    scored = {(tag, step) for tag, step in sqlite3.connect(db).execute(
        "SELECT tag, step FROM scores WHERE status='ok' AND metric='word_perplexity'")}
    assert scored == {(tag, step) for tag in ("original", "lawa-k3-nu1000") for step in (3000, 5000, 7000)}
    assert set(hub.gets.values()) == {1}  # scoring the originals cost no second download
    # on its own, `ckptavg eval` must fetch the originals again (they were deleted after averaging)
    before = Counter(hub.gets)
    r = ckptavg(hub, tmp_path, "eval", str(out / "pythia-70m-deduped" / "lawa-k3-nu1000"), "--tasks", "tiny",
                "--results", str(tmp_path / "b.sqlite"), *score)
    assert r.returncode == 0, r.stderr
    assert "originals to fetch from the Hub: 3" in " ".join(r.stderr.split())
    again = hub.gets - before
    assert {branch for _, branch, _ in again} == {"step3000", "step5000", "step7000"}
    fresh = dict(sqlite3.connect(tmp_path / "b.sqlite").execute(
        "SELECT tag || step, value FROM scores WHERE metric='word_perplexity' AND status='ok'"))
    first = dict(sqlite3.connect(db).execute(
        "SELECT tag || step, value FROM scores WHERE metric='word_perplexity' AND status='ok'"))
    assert fresh.keys() == first.keys() and all(fresh[k] == pytest.approx(first[k], rel=1e-9) for k in first)
    assert cached_files(tmp_path) == []


def test_a_download_corrupted_once_is_fetched_again_and_verified(hub, tmp_path):
    """huggingface_hub names the blob by the announced hash whatever arrives: ckptavg checks the bytes."""
    hub.gets.clear()
    hub.corrupt[("step2000", "model.safetensors")] = 1
    r = ckptavg(hub, tmp_path, "pythia", "--model", "70m", *LAWA, "--end", "3000", "--out", str(tmp_path / "out"),
                "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "pythia-70m-deduped" / "lawa-k3-nu1000" / "step3000"
    assert_matches(out, reference_average([hub.folders[s] for s in (1000, 2000, 3000)]), max_ulp=1)
    assert hub.gets[(REPO, "step2000", "model.safetensors")] == 2
    manifest = json.loads((out / "ckptavg.json").read_text())
    sources = {f["name"]: f["sha256_source"] for i in manifest["inputs"] for f in i["files"]}
    assert set(sources.values()) == {"verified"}, sources


def test_a_download_corrupted_every_time_is_an_error_and_nothing_is_written(hub, tmp_path):
    hub.gets.clear()
    hub.corrupt[("step2000", "model.safetensors")] = 10
    try:
        r = ckptavg(hub, tmp_path, "pythia", "--model", "70m", *LAWA, "--out", str(tmp_path / "out"), "--device",
                    "cpu", "-q")
    finally:
        hub.corrupt.clear()
    assert r.returncode == 2, r.stderr
    message = " ".join(r.stderr.split())
    expected = hashlib.sha256((hub.folders[2000] / "model.safetensors").read_bytes()).hexdigest()
    assert f"{REPO}@step2000: model.safetensors arrived corrupt twice" in message and expected in message
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3
    assert hub.gets[(REPO, "step2000", "model.safetensors")] == 2
    assert not any((tmp_path / "out").rglob("ckptavg.json"))  # the first window needs step2000
    blobs = [p.name for p in cached_files(tmp_path) if p.parent.name == "blobs"]
    assert expected not in blobs  # the corrupt bytes are not left under the good name


@pytest.mark.parametrize("args, message", [
    pytest.param(("--device", "cuda"), "no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")),
    (("--device", "tpu"), "unsupported device 'tpu'"),
    (("--disk-budget", "banana"), "--disk-budget: not a size: 'banana'"),
    (("--dtype", "float17"), "--dtype: unknown value 'float17'"),
    (("--eval", "tiny", "--ppl-task", "tiny=/nonexistent.jsonl"), "no such file /nonexistent.jsonl"),
    (("--eval", "tiny", "--limit", "0"), "--limit must be at least 1"),
    (("--in-memory",), "--in-memory needs --eval"),
    (("--eval", "pile-enron"), "need --pile FILE"),
    (("--method", "median"), "unknown --method 'median'"),
    (("--ema-alpha", "1.5", "--method", "ema"), "--ema-alpha must be in (0, 1]"),
])
@pytest.mark.parametrize("command", ["pythia", "trajectory"])
def test_every_option_is_checked_before_the_hub_is_asked_anything(hub, tmp_path, command, args, message):
    hub.requests.clear()
    source = ("--model", "70m") if command == "pythia" else (REPO,)
    r = ckptavg(hub, tmp_path, command, *source, *LAWA, *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert hub.requests == [] and not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()


def test_a_hub_dry_run_lists_but_downloads_and_writes_nothing(hub, tmp_path):
    hub.requests.clear()
    r = ckptavg(hub, tmp_path, "trajectory", REPO, *LAWA, "--out", str(tmp_path / "out"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "3 window(s) to average" in r.stdout and "to download" in r.stdout
    assert "step5000, step6000 share weights byte for byte" in " ".join(r.stderr.split())  # from the listings
    assert not [q for q in hub.requests if "/resolve/" in q]
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckptavg-cache").exists()


def test_two_runs_sharing_one_cache_never_delete_what_the_other_holds(hub, tmp_path):
    """A k=3 run holds steps 1000 and 2000 and waits on step3000's download while a k=2 run over steps 1000
    and 2000 starts, averages and finishes in the same cache: the k=2 run must delete neither (nor the
    k=3 run's half-downloaded step3000 as a leftover); the k=3 run then finishes exact and, last to let go,
    deletes everything it and the other downloaded."""
    hub.stall, hub.release = ("step3000", "pytorch_model-00001-of-00002.bin"), type(hub.release)()
    hub.stalled.clear()
    k3 = ("--k", "3", "--nu", "1000", "--interval", "1000", "--start", "3000", "--end", "3000")
    k2 = ("--k", "2", "--nu", "1000", "--interval", "1000", "--start", "2000", "--end", "2000")
    waiting = ckptavg(hub, tmp_path, "pythia", "--model", "70m", *k3, "--out", str(tmp_path / "k3"),
                      "--device", "cpu", wait=False)
    try:
        assert hub.stalled.wait(60), "the k=3 run never reached step3000"
        hub.stall = None
        before = set(cached_files(tmp_path))
        snapshots = {p.parent.name for p in before if p.parent.parent.name == "snapshots"}
        assert {hub.commit(REPO, "step1000"), hub.commit(REPO, "step2000")} <= snapshots
        r = ckptavg(hub, tmp_path, "pythia", "--model", "70m", *k2, "--out", str(tmp_path / "k2"), "--device", "cpu")
        assert r.returncode == 0, r.stderr
        assert before <= set(cached_files(tmp_path))  # every file the k=3 run had is still there
    finally:
        hub.release.set()
        out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    assert_matches(tmp_path / "k2" / "pythia-70m-deduped" / "lawa-k2-nu1000" / "step2000",
                   reference_average([hub.folders[s] for s in (1000, 2000)]), max_ulp=1)
    assert_matches(tmp_path / "k3" / "pythia-70m-deduped" / "lawa-k3-nu1000" / "step3000",
                   reference_average([hub.folders[s] for s in (1000, 2000, 3000)]), max_ulp=1)
    assert cached_files(tmp_path) == []


def test_following_a_repo_whose_trainer_pushes_each_checkpoint_as_a_branch(hub, tmp_path):
    """`trajectory ORG/NAME --follow`: branches appear while the follower runs; each window is averaged once
    its newest branch is there, from revisions fetched once each and evicted after their last window."""
    repo = "someone/live-run"
    hub.add_branch(repo, "step1000", hub.folders[1000])
    follower = ckptavg(hub, tmp_path, "trajectory", repo, "--follow", "--k", "2", "--nu", "1000", "--interval",
                       "1000", "--start", "2000", "--until", "4000", "--poll", "1s", "--out", str(tmp_path / "out"),
                       "--device", "cpu", "-q", wait=False)
    outputs = tmp_path / "out" / "live-run" / "lawa-k2-nu1000"
    try:
        for step in (2000, 3000, 4000):
            time.sleep(2)  # (the follower has listed the branches without this one)
            assert follower.poll() is None, follower.communicate()
            hub.add_branch(repo, f"step{step}", hub.folders[step])
        stdout, stderr = follower.communicate(timeout=240)
    finally:
        follower.kill()
    assert follower.returncode == 0, stderr
    assert sorted(p.name for p in outputs.glob("step*")) == ["step2000", "step3000", "step4000"]
    for t in (2000, 3000, 4000):
        assert_matches(outputs / f"step{t}", reference_average([hub.folders[t - 1000], hub.folders[t]]), max_ulp=1)
    gets = Counter((branch, name) for (r, branch, name), n in hub.gets.items() if r == repo for _ in range(n))
    assert gets and set(gets.values()) == {1}  # each file of each revision fetched once
    log = [json.loads(line) for line in (outputs / "ckptavg-run.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in log if r["action"] == "average") == [2000, 3000, 4000]
    snapshots = tmp_path / "hf" / "hub" / "models--someone--live-run" / "snapshots"
    assert not [p for p in snapshots.rglob("*") if not p.is_dir()]  # each revision deleted after its last window
