"""The operating system failing mid-run: one line naming the path and the cause, exit code 3, nothing
half-written left behind, and a trajectory that resumes once the cause is gone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import assert_matches, cli, pythia_state_dict, reference_average, write_checkpoint

WINDOWS = ("--k", "2", "--nu", "1000", "--interval", "1000", "--start", "2000", "--end", "4000", "-q")


@pytest.fixture
def run(tmp_path):
    """Steps 1000-4000 in four layouts, so each weight file has a size of its own."""
    root = tmp_path / "run"
    for i, fmt in enumerate(["bin", "safetensors", "bin-sharded", "safetensors-sharded"]):
        write_checkpoint(root / f"step{1000 * (i + 1)}", pythia_state_dict(i, torch.float16), fmt)
    return root


def leftovers(folder):
    return [p for p in folder.rglob(".*") if ".ckptavg-tmp-" in p.name]


@pytest.fixture
def small_disk(tmp_path):
    """A 100 KiB tmpfs: room for one tiny output, not for two."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(where)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_disk_full_mid_run_is_one_line_and_the_run_resumes(run, small_disk, monkeypatch):
    import ckptavg.engine.writer

    # the free-space check passes: another process takes the space after it, as happens on shared disks
    real = shutil.disk_usage
    monkeypatch.setattr(ckptavg.engine.writer.shutil, "disk_usage", lambda p: real(p)._replace(free=10**12))
    r = cli("trajectory", str(run), *WINDOWS, "--out", str(small_disk))
    assert r.exit_code == 3, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert "No space left on device (ENOSPC)" in lines[0] and str(small_disk / "run" / "lawa-k2-nu1000") in lines[0]
    base = small_disk / "run" / "lawa-k2-nu1000"
    finished = sorted(p.name for p in base.glob("step*"))
    assert finished == ["step2000"] and leftovers(small_disk) == []
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    r = cli("trajectory", str(run), *WINDOWS[:-1], "--out", str(small_disk))
    assert r.exit_code == 0, r.output
    assert "2 window(s) to average (1 already finished)" in r.output
    for t in (2000, 3000, 4000):
        assert_matches(base / f"step{t}", reference_average([run / f"step{t - 1000}", run / f"step{t}"]), max_ulp=1)


def test_an_input_losing_read_permission_is_one_line_and_the_run_resumes(run, tmp_path):
    """Run without the capability that lets root read anything, so that file modes apply."""
    shards = sorted((run / "step3000").glob("*.bin"))
    for f in shards:
        f.chmod(0)
    out = tmp_path / "out"
    cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "ckptavg", "trajectory",
           str(run), *WINDOWS, "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), CKPTAVG_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{shards[0]}: Permission denied (EACCES)" in " ".join(r.stderr.split())
    base = out / "run" / "lawa-k2-nu1000"
    assert sorted(p.name for p in base.glob("step*")) == ["step2000"] and leftovers(out) == []
    for f in shards:
        f.chmod(0o644)
    r = subprocess.run(cmd[2:], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in base.glob("step*")) == ["step2000", "step3000", "step4000"]
