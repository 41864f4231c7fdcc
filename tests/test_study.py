"""Studies: a grid of runs over a Hub trajectory from one file, every revision fetched once for the whole grid.

Runs `ckptavg study` in a process of its own against the test Hub server, which counts every download.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from conftest import (
    assert_matches,
    char_tokenizer,
    hub_cli,
    load_reference,
    pythia_state_dict,
    recursive_ema,
    reference_average,
    ulp_distance,
    write_checkpoint,
)
from hubserver import HubServer

pytestmark = pytest.mark.slow  # a ckptavg process per test
REPO = "someone/grid-run"
STEPS = list(range(1000, 7000, 1000))
GRID = """
out = "out"

[steps]
interval = 1000

[[sources]]
hub = "someone/grid-run"

[[runs]]
method = "lawa"
k = [2, 3]
nu = [1000, 2000]

[[runs]]
method = "ema"
k = 2
nu = 1000
ema_alpha = 0.5
"""
# each run starts at its first full window: k2-nu1000 at 2000, k3-nu1000 and k2-nu2000 at 3000, k3-nu2000 at 5000
LAWA = {(2, 1000): 2000, (3, 1000): 3000, (2, 2000): 3000, (3, 2000): 5000}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    server = HubServer()
    server.folders = {}
    for i, step in enumerate(STEPS):
        folder = write_checkpoint(root / f"step{step}", pythia_state_dict(i, torch.float16, buffers=i % 2 == 0),
                                  "bin" if i % 2 == 0 else "safetensors")
        char_tokenizer().save_pretrained(folder)
        server.add_branch(REPO, f"step{step}", folder)
        server.folders[step] = folder
    server.start()
    yield server
    server.stop()


def study(tmp_path, text: str = GRID):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def resolves(hub: HubServer) -> list[str]:
    return [r for r in hub.requests if "/resolve/" in r]


def test_a_grid_fetches_every_revision_once_and_a_rerun_does_nothing(hub, tmp_path):
    hub.gets.clear()
    file = study(tmp_path)
    r = hub_cli(hub, tmp_path, "study", "plan", str(file), "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "5 run(s) per source" in text and "6 revision(s) fetched once each" in text and not hub.gets
    r = hub_cli(hub, tmp_path, "study", "run", str(file), "--root", str(tmp_path), "-q")
    assert r.returncode == 0, r.stderr
    # every weight file of every revision the grid needs, fetched exactly once for all five runs
    assert set(hub.gets.values()) == {1}
    assert {branch for _, branch, _ in hub.gets} == {f"step{s}" for s in STEPS}
    base = tmp_path / "out" / "grid-run"
    for (k, nu), first in LAWA.items():
        for t in range(first, 7000, 1000):
            members = [hub.folders[s] for s in range(t - (k - 1) * nu, t + 1, nu)]
            assert_matches(base / f"lawa-k{k}-nu{nu}" / f"step{t}", reference_average(members), max_ulp=1)
    for t in range(2000, 7000, 1000):
        expected = recursive_ema([hub.folders[s] for s in range(1000, t + 1, 1000)], 0.5)
        got = load_reference(base / "ema-alpha0.5-k2-nu1000" / f"step{t}")
        for name, want in expected.items():
            assert int(ulp_distance(got[name], want).max()) <= 1, (t, name)
    manifests = {p: p.stat().st_mtime_ns for p in base.rglob("ckptavg.json")}
    assert len(manifests) == sum(len(range(first, 7000, 1000)) for first in LAWA.values()) + 5
    log = [json.loads(line) for line in (base / "ckptavg-run.jsonl").read_text().splitlines()]
    assert Counter(e["action"] for e in log)["fetch"] == len(STEPS) and log[-1]["source_disk"] == 0

    hub.requests.clear()
    r = hub_cli(hub, tmp_path, "study", "run", str(file), "--root", str(tmp_path), "-q")
    assert r.returncode == 0 and "0 output(s) written" in r.stderr, r.stderr
    assert resolves(hub) == [] and {p: p.stat().st_mtime_ns for p in base.rglob("ckptavg.json")} == manifests
    r = hub_cli(hub, tmp_path, "study", "status", str(file), "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = [line.split("│")[1:-1] for line in r.stdout.splitlines() if "grid-run" in line]
    assert len(rows) == 5 and all(cells[4].strip() == "0" for cells in rows)  # nothing pending


@pytest.mark.parametrize("change, message", [
    (('method = "ema"', 'method = "median"'), "unknown method 'median'"),
    (("k = [2, 3]", "k = [0, 3]"), "k must be at least 1"),
    (("interval = 1000", "interval = 1000\nstart = 1500"), "window at step 1500 needs step(s) 500, 1500"),
    (('out = "out"', 'out = "out"\ndisk_budget = "1000"'), "cannot hold one window"),
    (('[[runs]]\nmethod = "ema"', '[[runs]]\nmetod = "ema"'), "unknown key(s) metod"),
])
def test_study_file_errors_are_one_line_before_any_download(hub, tmp_path, change, message):
    hub.requests.clear()
    file = study(tmp_path, GRID.replace(*change, 1))
    r = hub_cli(hub, tmp_path, "study", "run", str(file), "--root", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3 and resolves(hub) == []
    assert not (tmp_path / "out").exists()


def test_paper_study_plans_offline_in_seconds(hub, tmp_path):
    """The committed paper study plans from the built-in catalogue with the Hub out of reach."""
    from pathlib import Path

    examples = Path(__file__).parents[1] / "examples" / "studies"
    shutil.copy(examples / "paper.toml", tmp_path / "paper.toml")
    r = hub_cli(hub, tmp_path, "study", "plan", str(tmp_path / "paper.toml"), offline=True,
                endpoint="http://127.0.0.1:9")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "328 window(s) to average over 4 source(s), 500 revision(s) fetched once each" in text
