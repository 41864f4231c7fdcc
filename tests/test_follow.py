"""`ckptavg trajectory --follow`: a real training process (the demo's trainer) saving every two steps and
deleting all but its newest four checkpoints, followed from another process: each window averaged once,
equal to the float64 mean of its members (including members the trainer deleted after ckptavg kept them),
a window whose member was gone before the follower started reported and skipped, a follower killed and
started again going on with nothing redone; and a checkpoint written slowly never read early."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_matches, pythia_state_dict, reference_average, write_checkpoint
from safetensors.torch import save_file

from ckptavg.manifest import MANIFEST
from ckptavg.trajectory.follow import Scanner, needed_steps
from ckptavg.trajectory.run import RunSpec

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "tiny_pythia" / "train.py"


def test_the_steps_kept_are_those_of_windows_still_to_do():
    """LAWA k=3, nu=2, every 4 from step 6; the trainer has 4, 6, 8 (2 deleted before it was kept)."""
    spec = RunSpec("lawa", 3, 2, 4, 6, 6)
    needed, lost = needed_steps(spec, 8, {4, 6, 8}, finished=lambda w: False)
    assert [w.step for w in lost] == [6]  # (2, 4, 6): 2 is gone
    assert needed == {6, 8, 10, 12, 14}  # windows 10 (6, 8, 10) and 14 (10, 12, 14), the next in reach
    needed, _ = needed_steps(spec, 8, {4, 6, 8}, finished=lambda w: w.step == 10)
    assert needed == {10, 12, 14}
    needed, _ = needed_steps(spec, 8, {4, 6, 8}, finished=lambda w: False, until=10)
    assert needed == {6, 8, 10}
    swa = RunSpec("swa", 3, 2, 4, 6, 6, swa_start=2)  # every checkpoint since the start, for every window
    assert needed_steps(swa, 8, {2, 4, 6, 8}, finished=lambda w: w.step == 6)[0] >= {2, 4, 6, 8}


def _follower(run: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ckptavg", "trajectory", str(run), "--follow", "--k", "3", "--nu", "2",
           "--interval", "4", "--start", "6", "--until", "18", "--poll", "1s", "--out", str(out), "-q"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent)


def _wait_for(path: Path, seconds: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear: {proc.communicate()}")
        time.sleep(0.2)


def test_following_a_training_run_that_deletes_its_checkpoints(tmp_path):
    run, retired, out = tmp_path / "run", tmp_path / "retired", tmp_path / "out"
    run.mkdir()
    trainer = subprocess.Popen(
        [sys.executable, str(TRAIN), "--out", str(run), "--steps", "20", "--every", "2", "--width", "32",
         "--layers", "1", "--ctx", "32", "--batch", "2", "--vocab", "256", "--max-files", "1", "--keep-last", "4",
         "--retire-to", str(retired), "--pause", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(retired / "step2", 120, trainer)  # the follower starts late: step 2 is gone, so window 6 is lost
        follower = _follower(run, out)
        outputs = out / "run" / "lawa-k3-nu2"
        _wait_for(outputs / "step10" / MANIFEST, 120, follower)
        follower.send_signal(signal.SIGKILL)  # no cleanup at all
        follower.wait()
        first = (outputs / "step10" / MANIFEST).stat().st_mtime_ns
        follower = _follower(run, out)  # started again: goes on from the kept checkpoints
        stdout, stderr = follower.communicate(timeout=240)
        assert follower.returncode == 0, stderr
        assert trainer.wait(timeout=120) == 0, trainer.stderr.read()
    finally:
        trainer.kill()
    assert "window at step 6 skipped" in stderr and "Traceback" not in stderr, stderr
    assert sorted(p.name for p in outputs.iterdir() if p.is_dir()) == ["step10", "step14", "step18"]
    assert (outputs / "step10" / MANIFEST).stat().st_mtime_ns == first  # not redone
    for step in (10, 14, 18):
        members = [retired / f"step{s}" if (retired / f"step{s}").is_dir() else run / f"step{s}"
                   for s in (step - 4, step - 2, step)]
        assert_matches(outputs / f"step{step}", reference_average(members), 0, torch.float64)
        manifest = json.loads((outputs / f"step{step}" / MANIFEST).read_text())
        assert [i["step"] for i in manifest["inputs"]] == [step - 4, step - 2, step]
        assert {i["source"] for i in manifest["inputs"]} == {str(run)}
    assert not [p for p in (out / "run" / ".ckptavg-kept").iterdir()]  # every kept step released
    log = [json.loads(line) for line in (outputs / "ckptavg-run.jsonl").read_text().splitlines()]
    averaged = [r["step"] for r in log if r["action"] == "average"]
    assert sorted(averaged) == [10, 14, 18]  # each window once, across the kill


def test_a_checkpoint_written_slowly_is_never_read_early(tmp_path):
    """Two shards trickling in and the index last, then a single-file save growing in place: no scan
    calls either complete before its last byte is in and a later scan finds it unchanged."""
    run = tmp_path / "run"
    (run / "step2").mkdir(parents=True)
    shards = {f"model-0000{i}-of-00002.safetensors": {f"w{i}": torch.randn(256, 256)} for i in (1, 2)}
    staged = tmp_path / "staged"
    staged.mkdir()
    for name, sd in shards.items():
        save_file(sd, staged / name)
    index = {"metadata": {}, "weight_map": {f"w{i}": f"model-0000{i}-of-00002.safetensors" for i in (1, 2)}}
    (staged / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"w": torch.randn(256, 256)}, staged / "model.safetensors")
    step2_done, done = threading.Event(), threading.Event()

    def write_slowly() -> None:
        for name in [*shards, "model.safetensors.index.json"]:
            data = (staged / name).read_bytes()
            with open(run / "step2" / name, "wb") as f:
                for i in range(0, len(data), 32 * 1024):
                    time.sleep(0.01)
                    f.write(data[i : i + 32 * 1024])
                    f.flush()
        step2_done.set()
        (run / "step4").mkdir()
        data = (staged / "model.safetensors").read_bytes()
        with open(run / "step4" / "model.safetensors", "wb") as f:
            for i in range(0, len(data), 32 * 1024):
                time.sleep(0.01)
                f.write(data[i : i + 32 * 1024])
                f.flush()
        done.set()

    scanner = Scanner(run)
    writer = threading.Thread(target=write_slowly)
    writer.start()
    early = []
    while not done.is_set():
        found = scanner.scan()
        early.append(((step2_done.is_set(), done.is_set()), found))  # written by the end of the scan?
        time.sleep(0.005)
    writer.join()
    assert len(early) > 20
    assert not any(2 in found for (two, _), found in early if not two)
    assert not any(4 in found for (_, four), found in early if not four)
    scanner.scan()
    assert scanner.scan() == {2: "step2", 4: "step4"}


def test_shards_without_their_index_are_a_save_still_being_written(tmp_path):
    from ckptavg.checkpoints.layouts import unfinished

    save_file({"w": torch.zeros(4)}, tmp_path / "model-00001-of-00002.safetensors")
    assert "no model.safetensors.index.json" in unfinished(tmp_path)


@pytest.fixture
def quiet_run(tmp_path):
    """A run whose trainer has stopped: steps 2, 4 and 6."""
    from conftest import pythia_state_dict, write_checkpoint

    for step in (2, 4, 6):
        write_checkpoint(tmp_path / "run" / f"step{step}", pythia_state_dict(step, torch.float32), "safetensors")
    return tmp_path / "run"


def test_a_follower_stops_after_idle_timeout_and_on_sigterm(quiet_run, tmp_path):
    args = ["trajectory", str(quiet_run), "--follow", "--k", "2", "--nu", "2", "--interval", "2", "--poll", "1s",
            "--out", str(tmp_path / "out"), "-q"]
    r = subprocess.run([sys.executable, "-m", "ckptavg", *args, "--idle-timeout", "3s"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "no new checkpoint in 3 s" in r.stderr, r.stderr
    outputs = tmp_path / "out" / "run" / "lawa-k2-nu2"
    assert sorted(p.name for p in outputs.glob("step*")) == ["step4", "step6"]  # from the first step's reach on
    for step in (4, 6):
        assert_matches(outputs / f"step{step}", reference_average([quiet_run / f"step{step - 2}",
                                                                    quiet_run / f"step{step}"]), 0, torch.float64)
    follower = subprocess.Popen([sys.executable, "-m", "ckptavg", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # (up, and idle: every window is done)
    follower.send_signal(signal.SIGTERM)
    stdout, stderr = follower.communicate(timeout=60)
    assert follower.returncode == 130 and "stopped" in stdout + stderr and "Traceback" not in stderr, stderr
    assert not [p for p in tmp_path.rglob("*") if ".ckptavg-tmp-" in p.name]


def test_follow_refuses_what_it_cannot_follow(tmp_path):
    from conftest import cli

    r = cli("trajectory", tmp_path / "nothing" / "here", "--follow", "--out", tmp_path)
    assert r.exit_code == 2 and "watches a run folder (local or on an object store) or a Hub repo" in r.stderr, \
        r.stderr
    (tmp_path / "empty").mkdir()
    r = cli("trajectory", tmp_path / "empty", "--follow", "--out", tmp_path)
    assert r.exit_code == 2 and "--start" in r.stderr, r.stderr
    r = cli("trajectory", tmp_path / "empty", "--until", "10", "--out", tmp_path)
    assert r.exit_code == 2 and "--follow" in r.stderr, r.stderr


def test_a_study_follows_its_sources_for_every_run_of_its_grid(quiet_run, tmp_path):
    """`study run --follow`: a training run (deleting all but its newest three checkpoints) and a finished one
    as two sources, each with a grid of two runs: every window of every run averaged once, exactly."""
    run, retired, out = tmp_path / "training", tmp_path / "retired", tmp_path / "out"
    run.mkdir()
    for step in (8, 10, 12):
        write_checkpoint(quiet_run / f"step{step}", pythia_state_dict(step, torch.float32), "safetensors")
    study = tmp_path / "follow.toml"
    study.write_text(f'out = "{out}"\n[steps]\nstart = 6\ninterval = 4\n[[sources]]\nlocal = "{run}"\n'
                     f'[[sources]]\nlocal = "{quiet_run}"\n[[runs]]\nmethod = "lawa"\nk = [2, 3]\nnu = 2\n')
    # the follower first (the study gives a start, so it needs no checkpoint yet), then the trainer: a busy
    # machine's slow start must not let the trainer delete a step before the follower has seen it
    follower = subprocess.Popen([sys.executable, "-m", "ckptavg", "study", "run", str(study), "--follow", "--until",
                                 "12", "--poll", "1s", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trainer = None
    try:
        assert follower.stderr.readline().startswith("following"), follower.communicate()
        trainer = subprocess.Popen(
            [sys.executable, str(TRAIN), "--out", str(run), "--steps", "12", "--every", "2", "--width", "32",
             "--layers", "1", "--ctx", "32", "--batch", "2", "--vocab", "256", "--max-files", "1", "--keep-last", "3",
             "--retire-to", str(retired), "--pause", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = follower.communicate(timeout=300)
        assert follower.returncode == 0, stderr
        assert trainer.wait(timeout=120) == 0, trainer.stderr.read()
    finally:
        follower.kill()
        if trainer is not None:
            trainer.kill()
    assert "skipped" not in stderr and "Traceback" not in stderr, stderr
    for source in (run, quiet_run):
        for k in (2, 3):
            outputs = out / source.name / f"lawa-k{k}-nu2"
            assert sorted(p.name for p in outputs.glob("step*")) == ["step10", "step6"]
            for step in (6, 10):
                members = [retired / f"step{s}" if source == run and (retired / f"step{s}").is_dir()
                           else source / f"step{s}" for s in range(step - 2 * (k - 1), step + 1, 2)]
                assert_matches(outputs / f"step{step}", reference_average(members), 0, torch.float64)
        log = [json.loads(line) for line in (out / source.name / "ckptavg-run.jsonl").read_text().splitlines()]
        assert sorted((r["run"], r["step"]) for r in log if r["action"] == "average") == [
            ("lawa-k2-nu2", 6), ("lawa-k2-nu2", 10), ("lawa-k3-nu2", 6), ("lawa-k3-nu2", 10)]
        assert not [p for p in (out / source.name / ".ckptavg-kept").iterdir()]


def test_study_follow_refuses_sources_it_cannot_follow(tmp_path):
    from conftest import cli

    study = tmp_path / "s.toml"
    study.write_text('[[sources]]\npythia = "70m"\n[steps]\ninterval = 2\n'
                     '[[runs]]\nmethod = "lawa"\nk = 2\nnu = 1\n')
    r = cli("study", "run", study, "--follow", "--root", tmp_path)
    assert r.exit_code == 2 and "Pythia 70m is finished: drop --follow" in r.stderr, r.stderr
    r = cli("study", "run", study, "--follow", "--executor", "slurm", "--root", tmp_path)
    assert r.exit_code == 2 and "--executor local" in r.stderr, r.stderr
    r = cli("study", "run", study, "--until", "4", "--root", tmp_path)
    assert r.exit_code == 2 and "go with --follow" in r.stderr, r.stderr


def test_kept_copies_stay_within_the_disk_budget(tmp_path):
    """Hard links cost nothing; a copy (the link refused across filesystems) counts against the budget, and a
    step whose copy would pass it is not kept, with a warning; a link whose trainer's file is gone counts."""
    import shutil as sh

    from ckptavg.errors import CkptavgWarning
    from ckptavg.trajectory.follow import Keeper

    for step in (2, 4):
        write_checkpoint(tmp_path / "run" / f"step{step}", pythia_state_dict(step, torch.float32), "safetensors")
    size = sum(p.stat().st_size for p in (tmp_path / "run" / "step2").iterdir())
    linked = Keeper(tmp_path / "kept", budget=size // 2)
    assert linked.keep(tmp_path / "run" / "step2") and linked.cost() == 0
    sh.rmtree(tmp_path / "run" / "step2")  # the trainer deletes its copy: the kept one now costs its size
    assert linked.cost() == size
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem to copy across")
    folder = Path(tempfile.mkdtemp(dir=other))
    try:
        copied = Keeper(folder / "kept", budget=size + size // 2)
        assert copied.keep(tmp_path / "run" / "step4") and copied.cost() == size
        with pytest.warns(CkptavgWarning, match="not kept: a copy would pass the --disk-budget"):
            assert not copied.keep(tmp_path / "kept" / "step2")
        assert sorted(p.name for p in (folder / "kept").iterdir()) == ["step4"]  # nothing half-kept
    finally:
        sh.rmtree(folder)


def test_a_trainer_checkpoint_counts_once_its_trainer_state_is_written(tmp_path):
    """transformers' Trainer writes trainer_state.json after the weights: a folder without it is a save still
    going on, however whole its weights are."""
    import shutil as sh

    data = ROOT / "tests" / "trainers" / "data" / "hf-trainer"
    sh.copytree(data / "checkpoint-2", tmp_path / "checkpoint-2")
    sh.copytree(data / "checkpoint-4", tmp_path / "checkpoint-4", ignore=sh.ignore_patterns("trainer_state.json"))
    scanner = Scanner(tmp_path)
    scanner.scan()
    assert scanner.scan() == {2: "checkpoint-2"}
    sh.copy(data / "checkpoint-4" / "trainer_state.json", tmp_path / "checkpoint-4")
    scanner.scan()
    assert scanner.scan() == {2: "checkpoint-2", 4: "checkpoint-4"}
