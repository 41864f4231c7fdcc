"""Input files hashed in a forked child while the command imports torch (`ckptavg/hash_ahead.py`): every
digest right, whatever point the claim comes at; nothing taken from a file changed since; no child left.

Each test runs in a process of its own: a child is forked only by a process that has not imported torch
and runs no other thread, which this one has and does."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from conftest import cached_share_of, evict, pythia_state_dict, write_checkpoint

from ckptavg.checkpoints.layouts import likely_weight_files
from ckptavg.manifest import MANIFEST

MiB = 1024 * 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_files(folder: Path, sizes_mib: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, size in enumerate(sizes_mib):
        files.append(folder / f"f{i}.bin")
        files[-1].write_bytes(os.urandom(MiB) * size)
    return files


def own_cache(tmp_path: Path) -> dict[str, str]:
    """The environment of a process with a hash cache of its own under `tmp_path`, importing this ckptavg."""
    return dict(os.environ, CKPTAVG_CACHE=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(sys.path))


def run(code: str, tmp_path: Path, files: list[Path] = ()) -> dict:
    """`code` in a fresh interpreter with its own hash cache, after a child was forked to hash `files`;
    what it printed last, as JSON."""
    script = textwrap.dedent(f"""
        import json, os, sys, time
        from pathlib import Path
        from ckptavg import hash_ahead
        from ckptavg.hashing import known_sha256
        def wait_until_hashed(files):
            deadline = time.time() + 60
            while not all(known_sha256(f) for f in files):
                assert time.time() < deadline, "the child hashed nothing"
                time.sleep(0.01)
        def named(hashes):
            return {{str(f): d for f, d in hashes.items()}}
        files = [Path(f) for f in {[str(f) for f in files]}]
        if files:
            hash_ahead.start(files)
    """) + textwrap.dedent(code)
    env = own_cache(tmp_path)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_claim_takes_every_file_the_child_finished(tmp_path):
    files = write_files(tmp_path / "in", [3, 20, 1])
    got = run("""
        wait_until_hashed(files)
        claim = hash_ahead.claim(files)
        print(json.dumps({"done": named(claim.done), "pending": claim.pending, "finish": claim.finish()}))
    """, tmp_path, files)
    assert got == {"done": {str(f): sha256(f) for f in files}, "pending": None, "finish": {}}


def test_a_claim_mid_file_leaves_that_file_to_the_child_and_stops_it_there(tmp_path):
    """Claimed once the child has read part of its first file: it finishes that one (the engine waits for
    it) and hashes none after it."""
    files = write_files(tmp_path / "in", [128, 128, 128])
    got = run("""
        io = Path(f"/proc/{hash_ahead._running.pid}/io")
        while int(io.read_text().split()[1]) < 4 * 1024 * 1024:  # rchar: what it has read
            time.sleep(0.001)
        claim = hash_ahead.claim(files)
        finished = named(claim.finish())
        print(json.dumps({"done": named(claim.done), "pending": str(claim.pending), "finish": finished,
                          "cached": [bool(known_sha256(f)) for f in files]}))
    """, tmp_path, files)
    pending = Path(got["pending"])
    assert pending in files
    assert got["finish"] == {str(pending): sha256(pending)}
    assert got["done"] == {str(f): sha256(f) for f in files[: files.index(pending)]}
    # it stopped after the file it was in: nothing later was hashed, or remembered
    assert got["cached"] == [i <= files.index(pending) for i in range(len(files))]


def test_a_file_on_disk_is_left_to_the_engine_unread(tmp_path):
    """The child hashes only what is in the page cache: a cold file is the engine's, read once, direct."""
    files = write_files(tmp_path / "in", [4, 4, 4])
    evict(files[1])
    got = run("""
        wait_until_hashed([files[0], files[2]])
        claim = hash_ahead.claim(files)
        print(json.dumps({"done": named(claim.done), "pending": claim.pending, "finish": claim.finish(),
                          "cached": bool(known_sha256(files[1]))}))
    """, tmp_path, files)
    assert got == {"done": {str(files[0]): sha256(files[0]), str(files[2]): sha256(files[2])}, "pending": None,
                   "finish": {}, "cached": False}
    assert cached_share_of(files[1], 0, 4 * MiB) < 0.01  # not read


def test_a_file_changed_since_the_child_hashed_it_is_not_taken(tmp_path):
    files = write_files(tmp_path / "in", [2, 2, 2])
    got = run("""
        wait_until_hashed(files)
        files[1].write_bytes(os.urandom(2 * 1024 * 1024))  # rewritten in place: the same size, a new mtime
        claim = hash_ahead.claim(files)
        print(json.dumps(sorted(str(f) for f in claim.done)))
    """, tmp_path, files)
    assert got == [str(files[0]), str(files[2])]


def test_the_child_exits_when_its_parent_does_without_a_claim(tmp_path):
    """A command that fails before it averages (a bad option) leaves no child hashing or waiting: one that
    has hashed everything and waits exits, and one in the middle of a file stops there."""
    for sizes in ([1], [512]):
        files = write_files(tmp_path / f"in{sizes[0]}", sizes)
        got = run(f"""
            if {sizes[0]} == 1:
                wait_until_hashed(files)
            print(json.dumps(hash_ahead._running.pid))
        """, tmp_path, files)
        deadline = time.time() + 30
        while _alive(got):
            assert time.time() < deadline, f"child {got} still runs"
            time.sleep(0.05)
        assert run(f"print(json.dumps(bool(known_sha256(Path('{files[0]}')))))", tmp_path) is (sizes == [1])


def test_a_bad_option_forks_no_child(tmp_path):
    """`ckptavg average` checks its options before it forks: one that fails on a typo hashes nothing."""
    folder = write_checkpoint(tmp_path / "step1", pythia_state_dict(1, torch.float16), "safetensors")
    env = own_cache(tmp_path)
    done = subprocess.run([sys.executable, "-m", "ckptavg", "average", str(folder), "-o", str(tmp_path / "avg"),
                           "--accumulate", "float8"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--accumulate" in done.stderr and "Traceback" not in done.stderr, done.stderr
    time.sleep(0.5)  # what a child would have had to hash the file
    files = [str(f) for f in likely_weight_files(folder)]
    assert run(f"print(json.dumps([f for f in {files} if known_sha256(Path(f))]))", tmp_path) == []
    assert not (tmp_path / "avg").exists()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_ckptavg_average_records_the_child_s_digests(tmp_path):
    """The command as a user runs it (the child forked before torch is imported), and an average through
    the Python API after a child finished every file: each input's sha256 right, computed in this run."""
    folders = [write_checkpoint(tmp_path / f"step{i}", pythia_state_dict(i, torch.float16), fmt)
               for i, fmt in enumerate(["safetensors", "safetensors-sharded", "bin"])]
    env = own_cache(tmp_path)
    done = subprocess.run([sys.executable, "-m", "ckptavg", "average", *map(str, folders), "-o",
                           str(tmp_path / "avg"), "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    api_out = tmp_path / "api"
    api = run(f"""
        folders = [Path(f) for f in {[str(f) for f in folders]}]
        wait_until_hashed(files)
        assert "torch" not in sys.modules
        from ckptavg.engine.average import average_checkpoints
        print(json.dumps(str(average_checkpoints(folders, Path("{api_out}"), device="cpu"))))
    """, tmp_path / "second", [f for d in folders for f in likely_weight_files(d)])
    for out in (tmp_path / "avg", Path(api)):
        inputs = json.loads((out / MANIFEST).read_text())["inputs"]
        recorded = {(i["path"], f["name"]): (f["sha256"], f["sha256_source"]) for i in inputs for f in i["files"]}
        assert recorded == {(str(d), f.name): (sha256(f), "computed")
                            for d in folders for f in sorted(d.iterdir()) if f.suffix in (".safetensors", ".bin")
                            and "index" not in f.name}, out
