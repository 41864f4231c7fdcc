"""The demo pipeline end to end through the real CLI, on a seconds-long model (`demo.py --tiny`)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
DEMO = Path(__file__).parents[1] / "examples" / "tiny_pythia" / "demo.py"


def test_demo_pipeline(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, CKPTAVG_CACHE=str(tmp_path / "cache"), HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    cmd = [sys.executable, str(DEMO), "--tiny", "--out", str(out), "--steps", "30", "--nu", "10", "--k", "2",
           "--interval", "10", "--lr", "1e-2"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = ["tiny-pythia-lr0.01", "tiny-pythia-lr0.001"]
    tags = dict.fromkeys(names, ["lawa-k2-nu10", "ema-alpha0.5-k2-nu10", "swa-fromfirst-k2-nu10", "wma-k2-nu10",
                                 "decay-1sqrt-k2-nu10"])  # one study
    for name in names:
        traj = out / "trajectories" / name
        assert sorted(p.name for p in traj.glob("step*")) == ["step10", "step20", "step30"]
        assert (traj / "step30" / "tokenizer.json").is_file() and (traj / "training.json").is_file()
        for tag in tags[name]:
            for step in (20, 30):
                manifest = json.loads((out / "averaged" / name / tag / f"step{step}" / "ckptavg.json").read_text())
                assert manifest["method"]["step"] == step and manifest["inputs"][-1]["step"] == step
    con = sqlite3.connect(out / "results.sqlite")
    keys = {(m, t, s) for m, t, s in con.execute(
        "SELECT model, tag, step FROM scores WHERE task='stdlib-heldout' AND metric='bits_per_byte' AND status='ok'")}
    assert keys == {(n, t, s) for n in names for t in ["original", *tags[n]] for s in (20, 30)}
    for png in ("lawa-vs-original-lr0.01.png", "lawa-vs-original-lr0.001.png", "methods.png", "savings.png"):
        data = (out / "figures" / png).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000
    text = " ".join(proc.stdout.split())
    assert "GPU hours of lawa-k2-nu10 on stdlib-heldout" in text and "ahead" in text and "(paper)" in text
    assert "held-out bits_per_byte, lawa-k2-nu10 vs original" in text
    # the run's own time, recorded (rounded to 0.1 s, so up to 0.05 s above the true time)
    assert 0 < json.loads((out / "demo.json").read_text())["seconds"] <= elapsed + 0.05
    # built once: a second run trains nothing and scores nothing again
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and again.stdout.count("trajectory present, reused") == 2
    assert "0 task score(s) written" in again.stderr


def test_the_committed_demo_study_is_what_the_demo_writes():
    """examples/tiny_pythia/study.toml, shown in the README, is the demo's own study at its defaults."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import demo; "
            "print(demo.study_file(['tiny-pythia-lr0.01', 'tiny-pythia-lr0.001'], 5, 50, 100, 1500, 0.5))")
    r = subprocess.run([sys.executable, "-c", code, str(DEMO.parent)], capture_output=True, text=True, check=True)
    assert r.stdout == (DEMO.parent / "study.toml").read_text()
