"""Studies: a grid of runs over a Hub trajectory from one file, every revision fetched once for the whole grid.

Runs `ckptavg study` in a process of its own against the test Hub server, which counts every download.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

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
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] == ["grid-run"]]
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


# -- on a real Slurm ----------------------------------------------------------------------------------
SCORED = GRID + """
[scoring]
tasks = ["tiny"]
ppl_task = ["tiny=docs.jsonl"]
"""
SLURM_ARGS = ("--executor", "slurm", "--partition", "debug", "--cpus-per-job", "1", "--jobs-per-source", "2",
              "--time-min", "10")


def conf(cluster) -> dict:
    return {"SLURM_CONF": str(cluster.conf)}  # what sbatch, squeue and sacct need; the jobs inherit the rest


def scored_study(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the cat sat", "a b c d")))
    return study(folder, SCORED)


def outputs(root):
    return {p.parent.relative_to(root): load_reference(p.parent) for p in sorted(root.rglob("ckptavg.json"))}


def rows(db):
    return sorted(sqlite3.connect(db).execute(
        "SELECT model, tag, step, task, metric, value FROM scores WHERE status='ok'").fetchall())


def test_slurm_gives_the_local_executors_outputs_and_rows(hub, slurm, tmp_path):
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    r = hub_cli(hub, local, "study", "run", str(scored_study(local)), "--root", str(local), "-q")
    assert r.returncode == 0, r.stderr
    r = hub_cli(hub, cluster, "study", "run", str(scored_study(cluster)), "--root", str(cluster), *SLURM_ARGS,
                env=conf(slurm))
    assert r.returncode == 0, r.stderr
    assert "by Slurm jobs" in r.stderr
    jobs = json.loads((cluster / "out" / ".study-study" / "jobs.json").read_text())
    assert len(jobs) == 2 and all(Path(j["stdout"]).is_file() for j in jobs)
    mine, theirs = outputs(local / "out"), outputs(cluster / "out")
    assert mine.keys() == theirs.keys() and len(mine) == 20  # 15 LAWA windows and 5 EMA
    for folder, tensors in mine.items():
        assert all(torch.equal(tensors[k], theirs[folder][k]) for k in tensors), folder
    assert rows(local / "results.sqlite") == rows(cluster / "results.sqlite") != []
    for _ in range(30):  # slurmdbd records a job's end a moment after the job has returned its result
        r = hub_cli(hub, cluster, "study", "status", str(cluster / "study.toml"), "--root", str(cluster),
                    env=conf(slurm) | {"COLUMNS": "400"})
        assert r.returncode == 0, r.stderr
        states = [line for line in r.stdout.splitlines() if "_0_log.err" in line]
        if all("COMPLETED" in line for line in states):
            break
        time.sleep(1)
    assert len(states) == 2 and all("COMPLETED" in line for line in states), r.stdout


def assert_the_scored_grid(hub, root: Path) -> None:
    """Every LAWA average of the scored study the float64 mean of its members, and every average and the
    original at each output step (2000 to 6000) scored once."""
    for (k, nu), first in LAWA.items():
        for t in range(first, 7000, 1000):
            members = [hub.folders[s] for s in range(t - (k - 1) * nu, t + 1, nu)]
            assert_matches(root / "out" / "grid-run" / f"lawa-k{k}-nu{nu}" / f"step{t}",
                           reference_average(members), max_ulp=1)
    scored = {(tag, step) for _, tag, step, *_ in rows(root / "results.sqlite")}
    assert len(scored) == 20 + 5


def test_a_cancelled_job_is_reported_and_a_resubmission_completes_the_study(hub, slurm, tmp_path):
    file = scored_study(tmp_path)
    hub.stall, hub.release = ("step6000", "model.safetensors"), type(hub.release)()
    hub.stalled.clear()
    proc = hub_cli(hub, tmp_path, "study", "run", str(file), "--root", str(tmp_path), *SLURM_ARGS, env=conf(slurm),
                   wait=False)
    try:
        assert hub.stalled.wait(120), "no job reached step6000"
        subprocess.run(["scancel", "--name", "study"], env=slurm.env, check=True)
        _, stderr = proc.communicate(timeout=120)
    finally:
        hub.stall = None
        hub.release.set()
    assert proc.returncode == 4, stderr
    assert "did not finish" in stderr and "run the study again" in " ".join(stderr.split())
    assert not [p for p in (tmp_path / "out").rglob("*") if ".ckptavg-tmp-" in p.name]
    r = hub_cli(hub, tmp_path, "study", "run", str(file), "--root", str(tmp_path), *SLURM_ARGS, env=conf(slurm))
    assert r.returncode == 0, r.stderr
    done = outputs(tmp_path / "out")
    assert len(done) == 20
    assert_the_scored_grid(hub, tmp_path)


def test_a_job_of_two_ranks_shares_each_average_and_its_rank_0_scores(hub, slurm, tmp_path):
    """`--ranks-per-job 2`: each array task is two ranks (srun's tasks), every average shared by both."""
    file = scored_study(tmp_path)
    r = hub_cli(hub, tmp_path, "study", "run", str(file), "--root", str(tmp_path), *SLURM_ARGS, "--ranks-per-job",
                "2", env=conf(slurm))
    assert r.returncode == 0, r.stderr
    manifests = sorted((tmp_path / "out").rglob("ckptavg.json"))
    assert len(manifests) == 20 and all(json.loads(m.read_text())["ranks"] == 2 for m in manifests)
    assert_the_scored_grid(hub, tmp_path)


def test_slurm_jobs_score_offline_once_the_task_data_is_fetched_here(hub, slurm, tmp_path):
    """`study plan --task-data` names a task whose Hub dataset is not cached; `study run --executor slurm
    --fetch-tasks` fetches it once on the submitting machine, and the jobs run with HF_DATASETS_OFFLINE=1:
    its data file is downloaded once in all, and every checkpoint is scored on it."""
    repo = tmp_path / "mc-repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "test.jsonl").write_text("".join(json.dumps({"q": q, "choices": [" a", " b"], "label": 0}) + "\n"
                                                      for q in ("x y", "b a")))
    hub.add_dataset("someone/mc-repo", repo)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hubmc.yaml").write_text(
        "task: hubmc\ndataset_path: someone/mc-repo\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    file = study(tmp_path, GRID.split("[[runs]]")[0] + '[[runs]]\nmethod = "lawa"\nk = 2\nnu = 1000\n\n'
                 '[scoring]\ntasks = ["hubmc"]\ninclude_path = ["tasks"]\n')
    online = {"HF_DATASETS_OFFLINE": "0"}
    r = hub_cli(hub, tmp_path, "study", "plan", str(file), "--root", str(tmp_path), "--task-data", env=online)
    assert r.returncode == 0 and "task data: not in the cache: hubmc (someone/mc-repo)" in r.stdout, r.stdout + r.stderr
    r = hub_cli(hub, tmp_path, "study", "run", str(file), "--root", str(tmp_path), *SLURM_ARGS, "--fetch-tasks",
                env=conf(slurm) | online)
    assert r.returncode == 0, r.stderr
    scripts = list((tmp_path / "out" / ".study-study" / "logs").glob("*_submission.sh"))
    assert scripts and all("export HF_DATASETS_OFFLINE=1" in p.read_text() for p in scripts)
    assert not any("HF_HUB_OFFLINE" in p.read_text() for p in scripts)  # the revisions come from the Hub
    got = rows(tmp_path / "results.sqlite")
    assert {(tag, step) for _, tag, step, task, _, _ in got if task == "hubmc"} == {
        (tag, step) for tag in ("original", "lawa-k2-nu1000") for step in range(2000, 7000, 1000)}
    assert sum("data/test.jsonl" in req and req.startswith("GET") for req in hub.requests) == 1
    r = hub_cli(hub, tmp_path, "study", "plan", str(file), "--root", str(tmp_path), "--task-data", env=online)
    assert "task data: every task is local or cached" in r.stdout, r.stdout
