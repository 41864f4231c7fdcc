"""Local trajectories, interpolation and the Pythia dry run, through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    assert_matches,
    cli,
    load_reference,
    pythia_state_dict,
    recursive_ema,
    reference_average,
    ulp_distance,
    write_checkpoint,
)

from ckptavg.trajectory import pythia
from ckptavg.trajectory.schedule import sequence
from ckptavg.units import format_size

STEPS = list(range(1000, 9000, 1000))



@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    root = tmp_path_factory.mktemp("traj") / "tiny-run"
    for i, step in enumerate(STEPS):  # formats alternate, as they do across real Pythia branches
        fmt = ["bin", "safetensors", "bin-sharded", "safetensors-sharded"][i % 4]
        write_checkpoint(root / f"step{step}", pythia_state_dict(i, torch.float16), fmt)
    return root


def test_lawa_windows_match_reference(traj, tmp_path):
    r = cli("trajectory", traj, "--k", 3, "--nu", 1000, "--interval", 2000, "--out", tmp_path, "-q")
    assert r.exit_code == 0, r.output
    base = tmp_path / "tiny-run" / "lawa-k3-nu1000"
    assert sorted(p.name for p in base.iterdir()) == ["ckptavg-run.jsonl", "step3000", "step5000", "step7000"]
    log = [json.loads(line) for line in (base / "ckptavg-run.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["action"] == "average"] == [3000, 5000, 7000]
    assert sorted(e["step"] for e in log if e["action"] == "fetch") == list(range(1000, 8000, 1000))
    for t in (3000, 5000, 7000):
        members = [traj / f"step{s}" for s in (t - 2000, t - 1000, t)]
        assert_matches(base / f"step{t}", reference_average(members), max_ulp=1)
        m = json.loads((base / f"step{t}" / "ckptavg.json").read_text())
        assert m["method"]["name"] == "lawa" and m["method"]["members"] == [t - 2000, t - 1000, t]
        assert [i["step"] for i in m["inputs"]] == [t - 2000, t - 1000, t]


def test_ema_and_swa_match_recursive_definitions(traj, tmp_path):
    r = cli("trajectory", traj, "--k", 2, "--interval", 3000, "--start", 4000, "--end", 7000,
            "--method", "ema", "--ema-alpha", 0.5, "--out", tmp_path, "-q")
    assert r.exit_code == 0, r.output
    seq = sequence(2, 1000, 3000, 4000, 7000)
    assert seq == [3000, 4000, 6000, 7000]
    for t in (4000, 7000):
        ref = recursive_ema([traj / f"step{s}" for s in seq if s <= t], 0.5)
        got = load_reference(tmp_path / "tiny-run" / "ema-alpha0.5-k2-nu1000" / f"step{t}")
        for name, want in ref.items():
            assert int(ulp_distance(got[name], want).max()) <= 1, name
    r = cli("trajectory", traj, "--k", 2, "--interval", 3000, "--start", 4000, "--end", 7000,
            "--method", "swa", "--swa-start", 4000, "--out", tmp_path, "-q")
    assert r.exit_code == 0, r.output
    members = [traj / f"step{s}" for s in (4000, 6000, 7000)]
    assert_matches(tmp_path / "tiny-run" / "swa-from4000-k2-nu1000" / "step7000", reference_average(members), 1)


def test_resume_skips_finished_windows(traj, tmp_path):
    args = ("trajectory", traj, "--k", 2, "--interval", 2000, "--out", tmp_path, "-q")
    assert cli(*args).exit_code == 0
    base = tmp_path / "tiny-run" / "lawa-k2-nu1000"
    stamps = {p.name: (p / "ckptavg.json").stat().st_mtime_ns for p in base.glob("step*")}
    import shutil

    shutil.rmtree(base / "step4000")
    r = cli("trajectory", traj, "--k", 2, "--interval", 2000, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert "1 window(s) to average (3 already finished)" in r.output
    after = {p.name: (p / "ckptavg.json").stat().st_mtime_ns for p in base.glob("step*")}
    assert set(after) == set(stamps)
    assert all(after[n] == stamps[n] for n in stamps if n != "step4000")


def test_dry_run_writes_nothing(traj, tmp_path):
    r = cli("trajectory", traj, "--k", 3, "--interval", 2000, "--out", tmp_path / "o", "--dry-run",
            "--eval", "some-task", "--results", tmp_path / "r.sqlite")
    assert r.exit_code == 0, r.output
    assert "3 window(s) to average" in r.output and not (tmp_path / "o").exists()
    assert not (tmp_path / "r.sqlite").exists()


@pytest.mark.parametrize("args, message", [
    (("--k", 0), "--k must be at least 1"),
    (("--nu", 0), "--nu must be positive"),
    (("--interval", 0), "--interval must be positive"),
    (("--start", 6000, "--end", 5000), "after --end"),
    (("--k", 2, "--nu", 1500, "--start", 4000), "needs step(s) 2500"),
    (("--method", "mean"), "unknown --method"),
])
def test_trajectory_errors(traj, tmp_path, args, message):
    r = cli("trajectory", traj, *args, "--out", tmp_path)
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output


def test_interpolate_endpoints_and_midpoint(traj, tmp_path):
    a, b = traj / "step1000", traj / "step2000"
    r = cli("interpolate", a, b, "--alphas", "0,0.5,1", "--out", tmp_path, "-q")
    assert r.exit_code == 0, r.output
    for alpha in (0, 0.5, 1):
        assert_matches(tmp_path / f"alpha{alpha:g}", reference_average([a, b], [alpha, 1 - alpha]), max_ulp=1)
    sa, sb = load_reference(a), load_reference(b)
    assert torch.equal(load_reference(tmp_path / "alpha1")["embed_out.weight"], sa["embed_out.weight"])
    assert torch.equal(load_reference(tmp_path / "alpha0")["embed_out.weight"], sb["embed_out.weight"])


def test_pythia_12b_dry_run_from_catalogue(tmp_path):
    r = cli("pythia", "--model", "12b", "--k", 5, "--interval", 3000, "--dry-run", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    n = len(sequence(5, 1000, 3000, 21000, 141000))
    size = pythia.model("12b").fp16_bytes
    assert "41 window(s) to average" in r.output
    assert f"{n} revision(s) to fetch, {format_size(n * size)} to download" in r.output
    assert f"peak disk {format_size(6 * size)}" in r.output  # five checkpoints and one output
    r = cli("pythia", "--model", "12b", "--dry-run", "--disk-budget", "100GB", "--out", tmp_path)
    assert r.exit_code == 2 and "cannot hold one window" in r.stderr
    r = cli("pythia", "--model", "13b", "--dry-run")
    assert r.exit_code == 2 and "unknown Pythia size" in r.stderr


def test_local_dry_run_reads_no_tensor_data(tmp_path):
    """Four 1 GB (sparse, not even valid) weight files: a dry run plans from names and sizes alone."""
    import os
    import subprocess
    import sys

    root = tmp_path / "big-run"
    for step in (1000, 2000, 3000, 4000):
        (root / f"step{step}").mkdir(parents=True)
        with open(root / f"step{step}" / "model.safetensors", "wb") as f:
            f.truncate(10**9)
    probe = ("import runpy, sys; sys.argv = ['ckptavg'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('ckptavg', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
             "rchar = [l for l in open('/proc/self/io') if l.startswith('rchar')][0].split()[1]\n"
             "print('RCHAR', rchar, 'EXIT', code, file=sys.stderr)")
    env = dict(os.environ, CKPTAVG_CACHE=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", probe, "trajectory", str(root), "--k", "2", "--interval", "1000",
                        "--out", str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True, env=env)
    rchar, code = r.stderr.split("RCHAR ")[1].split(" EXIT ")
    assert code.strip() == "0", r.stderr
    assert int(rchar) < 300 * 10**6  # the interpreter and its modules; the weights are 4 GB
    text = " ".join(r.stdout.split())
    assert "3 window(s) to average" in text and "4 local checkpoint(s) to read (4.0 GB)" in text
    assert "to download" not in text and "a dry run reads no tensor data" in " ".join(r.stderr.split())
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_local_duplicate_check_hashes_only_candidates(traj, tmp_path, monkeypatch):
    import shutil

    from ckptavg.hashing import cached_hashes
    from ckptavg.trajectory.sources import LocalTrajectory

    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "run"
    for step in (1000, 2000, 3000):
        shutil.copytree(traj / f"step{step}", root / f"step{step}")
    shutil.copytree(traj / "step2000", root / "step4000")  # served twice, as Pythia's bad branches are
    shutil.copytree(traj / "step6000", root / "step5000")  # the same size as step2000, other bytes
    sizes = {(root / f"step{s}" / "model.safetensors").stat().st_size for s in (2000, 5000)}
    assert len(sizes) == 1
    found = LocalTrajectory(root).duplicates([1000, 2000, 3000, 4000, 5000])
    assert [d.revisions for d in found] == [("step2000", "step4000")]
    hashed = cached_hashes()
    assert sorted(k.split("|")[0].rsplit("/", 2)[-2] for k in hashed) == ["step2000", "step4000"]
    assert LocalTrajectory(root).duplicates([1000, 3000, 4000], read_data=False) == []


def test_a_run_tells_its_listeners_each_moment_in_order(tmp_path):
    """`api.run_trajectory(..., events=...)`: the plan first, then each checkpoint as it is on disk and each
    window before and after it is averaged, to every listener of a Broadcast."""
    from ckptavg import api
    from ckptavg.trajectory.events import Broadcast, Events

    for step in (1, 2, 3):
        write_checkpoint(tmp_path / "run" / f"step{step}", pythia_state_dict(step, torch.float32), "safetensors")

    class Recorder(Events):
        def __init__(self) -> None:
            self.heard: list = []

        def planned(self, plan, duplicates) -> None:
            self.heard.append(("planned", [j.window.step for j in plan.todo]))

        def fetched(self, step, folder) -> None:
            self.heard.append(("fetched", step))

        def window_inputs(self, job, folders) -> None:
            self.heard.append(("inputs", job.window.step, [f.name for f in folders]))

        def averaged(self, job, folder) -> None:
            self.heard.append(("averaged", job.window.step, folder))

    first, second = Recorder(), Recorder()
    run = api.run_trajectory(api.open_trajectory(tmp_path / "run"), api.RunSpec("lawa", 2, 1, 1, 2, 3),
                             tmp_path / "out", api.Averaging(device="cpu"), events=Broadcast(first, None, second))
    out = tmp_path / "out" / "run" / "lawa-k2-nu1"
    assert first.heard == second.heard == [
        ("planned", [2, 3]), ("fetched", 1), ("fetched", 2), ("inputs", 2, ["step1", "step2"]),
        ("averaged", 2, out / "step2"), ("fetched", 3), ("inputs", 3, ["step2", "step3"]),
        ("averaged", 3, out / "step3")]
    assert list(run.written) == [out / "step2", out / "step3"]
