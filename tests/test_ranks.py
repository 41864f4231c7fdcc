"""One average on several ranks (issue 41, first part): `torchrun` launches ckptavg like a trainer, each rank
writes its share of the output files, rank 0 commits; the ranks check they planned the same average, and a
failure on one stops all with nothing left."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_matches, cli, reference_average
from safetensors.torch import load_file, save_file

from ckptavg.engine.ranks import Ranks, first_host, from_environment


def test_the_rank_comes_from_torchrun_or_srun_and_alone_is_none():
    torchrun = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
                "MASTER_PORT": "29400"}
    assert from_environment(torchrun) == Ranks(2, 4, 0, 2, "n1", 29400)
    elastic = {**torchrun, "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "x",
               "TORCHELASTIC_RESTART_COUNT": "1"}  # (torchrun's agent serves the store: joined under a prefix)
    assert from_environment(elastic) == Ranks(2, 4, 0, 2, "n1", 29400, "ckptavg/x/1/")
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
            "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_JOB_ID": "1234"}
    assert from_environment(srun) == Ranks(5, 8, 1, 2, "gpu07", 21234)
    assert from_environment({}) is None
    assert from_environment({**torchrun, "WORLD_SIZE": "1"}) is None
    assert from_environment({k: v for k, v in srun.items() if k != "SLURM_STEP_ID"}) is None  # sbatch, no srun
    assert first_host("node1,node2") == "node1" and first_host("a[3,5-9]") == "a3"


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ranks")
    folders = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        folder = root / f"step{i}"
        folder.mkdir()
        save_file({**{f"layer.{j}.weight": torch.randn(64, 64 + j, generator=g).half() for j in range(10)},
                   "steps": torch.tensor([i])}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"step": i}))
        folders.append(folder)
    return folders


def torchrun(ranks: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(ranks), "--no-python", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))


def launch(ranks: int, *args, cwd: Path, rank_args: dict[int, list] | None = None) -> list[subprocess.Popen]:
    """`ranks` processes of `args` with the variables a launcher sets (as srun's tasks find theirs), each rank
    in `rank_args` running its own command instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return [subprocess.Popen([str(a) for a in (rank_args or {}).get(r, args)], cwd=cwd, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(ranks)]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    said = [p.communicate(timeout=300)[0] for p in procs]
    return [(p.returncode, text) for p, text in zip(procs, said, strict=True)]


def errors(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_three_ranks_write_the_same_average_as_one_process(three, tmp_path):
    out = tmp_path / "avg"
    r = torchrun(3, sys.executable, "-m", "ckptavg", "average", *three, "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    said = r.stdout + r.stderr
    assert "3 ranks" in said and said.count("wrote") == 1  # (rank 0 says it)
    manifest = json.loads((out / "ckptavg.json").read_text())
    files = [f["name"] for f in manifest["output"]["files"]]
    assert len(files) >= 3 and sorted(files) == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert manifest["device"] == "cpu" and manifest["ranks"] == 3
    for i in manifest["inputs"]:  # (each file hashed whole by one rank, in its pass or apart)
        assert all(f["sha256"] == hashlib.sha256((Path(i["path"]) / f["name"]).read_bytes()).hexdigest()
                   for f in i["files"])
    assert (out / "config.json").read_text() == json.dumps({"step": 2})
    assert_matches(out, reference_average(three), max_ulp=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".avg")]


@pytest.mark.slow
def test_ranks_given_other_inputs_or_failing_stop_together_with_nothing_written(three, tmp_path):
    odd = tmp_path / "odd.sh"
    odd.write_text(f"""#!/bin/sh
if [ "$RANK" = 1 ]; then set -- {three[0]} {three[2]} {three[1]}; else set -- {' '.join(map(str, three))}; fi
exec {sys.executable} -m ckptavg average "$@" --out avg
""")
    odd.chmod(0o755)
    r = torchrun(2, odd, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stdout
    said = errors(r)
    assert len(said) == 2 and all("rank 1 planned another average than rank 0" in line for line in said), said
    missing = tmp_path / "missing.sh"
    missing.write_text(f"""#!/bin/sh
if [ "$RANK" = 1 ]; then first=/nonexistent/step0; else first={three[0]}; fi
exec {sys.executable} -m ckptavg average $first {three[1]} --out avg
""")
    missing.chmod(0o755)
    r = torchrun(2, missing, cwd=tmp_path)
    said = sorted(errors(r))
    assert len(said) == 2 and "no such file or folder" in said[0] and "rank 1 of 2 failed" in said[1], said
    assert not [p for p in tmp_path.iterdir() if "avg" in p.name]


@pytest.mark.slow
def test_srun_launches_the_ranks_of_one_average(three, tmp_path, slurm):
    """A real Slurm (Debian's daemons, started here): `srun -n 2` gives each task its SLURM_PROCID, and the step's
    first host is the group's address. (The node declares this machine's 2 CPUs; --overcommit is srun's.)"""
    out = tmp_path / "avg"
    r = subprocess.run(["srun", "-n", "2", "--overcommit", sys.executable, "-m", "ckptavg", "average", *map(str, three),
                        "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, SLURM_CONF=str(slurm.conf), PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks" in r.stdout + r.stderr
    assert json.loads((out / "ckptavg.json").read_text())["ranks"] == 2
    assert_matches(out, reference_average(three), max_ulp=0)


@pytest.mark.slow
def test_more_ranks_than_output_files_leave_some_idle_and_all_finish(tmp_path):
    folders = []
    for i in range(2):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        save_file({"w": torch.full((8, 8), float(i)), "b": torch.full((8,), float(i))}, folder / "model.safetensors")
        folders.append(folder)
    r = torchrun(3, sys.executable, "-m", "ckptavg", "average", *folders, "--out", "avg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "avg").glob("*.safetensors"))) == 2  # (one tensor a file at most: rank 2 idle)
    assert_matches(tmp_path / "avg", reference_average(folders), max_ulp=0)


@pytest.mark.slow
def test_a_dcp_save_of_three_ranks_is_merged_by_two(tmp_path):
    """The split is by output file: each rank reads whatever pieces of the inputs its tensors need, however many
    ranks saved them."""
    saver = Path(__file__).with_name("dcpsave.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, str(saver), str(tmp_path), "3", "1", "2"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [tmp_path / "step1", tmp_path / "step2"]
    r = torchrun(2, sys.executable, "-m", "ckptavg", "average", *steps, "--out", "two", "--output-format",
                 "safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    from ckptavg.engine.average import average_in_memory

    one = average_in_memory(steps)
    got = {}
    for f in (tmp_path / "two").glob("*.safetensors"):
        got.update(load_file(f))
    assert got.keys() == one.keys() and all(torch.equal(got[k], one[k]) for k in one)


KILLED_MID_WRITE = """
import os, signal, sys
from ckptavg.engine.average import average_checkpoints
from ckptavg.engine.ranks import from_environment

average_checkpoints(sys.argv[1:-1], sys.argv[-1], ranks=from_environment(), timeout=3,
                    progress=lambda plan: lambda nbytes: os.kill(os.getpid(), signal.SIGKILL))
"""


@pytest.mark.slow
def test_a_rank_killed_mid_write_stops_the_others_and_the_rerun_keeps_their_files(three, tmp_path):
    out = tmp_path / "avg"
    command = [sys.executable, "-m", "ckptavg", "average", *three, "--out", out, "--timeout", "3"]
    started = time.monotonic()
    said = finish(launch(3, *command, cwd=tmp_path,
                         rank_args={2: [sys.executable, "-c", KILLED_MID_WRITE, *three, out]}))
    assert time.monotonic() - started < 120
    assert said[2][0] == -signal.SIGKILL
    for code, text in said[:2]:
        assert code == 2 and "Traceback" not in text, text
        assert "error: rank 2 of 3 has been silent for 3 s" in text, text
    assert not out.exists()
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(".avg.ckptavg-tmp-plan@")]
    done = sorted(p.name.removesuffix(".done") for p in (kept / ".done").iterdir())
    assert len(done) == 2  # (ranks 0 and 1 finished theirs)
    stamps = {n: (kept / n).stat().st_mtime_ns for n in done}
    said = finish(launch(3, *command, cwd=tmp_path))
    assert [code for code, _ in said] == [0, 0, 0], said
    assert {n: (out / n).stat().st_mtime_ns for n in done} == stamps  # taken as they were, not written again
    assert not (out / ".done").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".avg")]
    assert_matches(out, reference_average(three), max_ulp=0)


@pytest.mark.slow
def test_a_second_launch_on_an_output_being_written_refuses(three, tmp_path):
    from ckptavg.engine.writer import try_lock, unlock

    held = try_lock(tmp_path / "avg")  # (as rank 0 of a live launch holds it)
    try:
        said = finish(launch(2, sys.executable, "-m", "ckptavg", "average", *three, "--out", "avg", cwd=tmp_path))
    finally:
        unlock(tmp_path / "avg", held)
    assert [code for code, _ in said] == [2, 2], said
    assert "another launch is writing it" in said[0][1] and "rank 0 of 2 failed" in said[1][1], said
    assert not (tmp_path / "avg").exists()


ON_RANKS = ["olmo-core-fsdp", "accelerate-fsdp", "megatron", "lightning", "deepspeed", "hf-trainer"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ON_RANKS)
def test_each_output_format_on_two_ranks_is_the_one_process_output(name, tmp_path):
    """DCP outputs (a `.distcp` file a rank, `.metadata` by rank 0, inside the trainer's folder, with the
    model's non-tensor entries), a trainer's single `torch.save` file (written by rank 0 alone) and sharded
    safetensors, from the real trainers' checkpoints: read back by torch's own loaders, bit for bit the
    one-process output."""
    from test_trainers import DATA, RUN, written

    from ckptavg.engine.average import average_checkpoints

    run = RUN[name]
    members = [DATA / run.name / run.checkpoint.format(s) for s in run.steps[-2:]]
    one = average_checkpoints(members, tmp_path / "one", device="cpu")
    said = finish(launch(2, sys.executable, "-m", "ckptavg", "average", *members, "--out", "two", "-q",
                         cwd=tmp_path))
    assert [code for code, _ in said] == [0, 0], said
    manifest = json.loads((tmp_path / "two" / "ckptavg.json").read_text())
    assert manifest["output"]["format"] == run.output and manifest["ranks"] == 2
    if run.output != "torch":  # (a file a rank: the work was shared)
        assert len(manifest["output"]["files"]) >= 2
    want, got = written(one, run), written(tmp_path / "two", run)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    side = json.loads((one / "ckptavg.json").read_text())["output"].get("side_files_from_newest_input", [])
    assert all((tmp_path / "two" / n).read_bytes() == (one / n).read_bytes() for n in side)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


SCHEDULE = ["--k", "2", "--nu", "10", "--interval", "10"]


def one_process_trajectory(three: list[Path], tmp_path: Path) -> tuple[Path, list[str]]:
    """A run folder of the three checkpoints (steps 10, 20, 30), and its LAWA windows averaged by one process
    into tmp_path/one: (the run folder, the schedule's options)."""
    run = tmp_path / "run"
    run.mkdir()
    for i, folder in enumerate(three):
        (run / f"step{(i + 1) * 10}").symlink_to(folder)
    one = cli("trajectory", run, *SCHEDULE, "--out", tmp_path / "one", "-q")
    assert one.exit_code == 0, one.stderr
    return run, SCHEDULE


@pytest.mark.slow
def test_a_trajectory_and_interpolations_on_two_ranks_are_the_one_process_outputs(three, tmp_path):
    """Every window (and alpha) shared by the ranks in turn, one group for the whole command; rank 0 speaks."""
    run, schedule = one_process_trajectory(three, tmp_path)
    said = finish(launch(2, sys.executable, "-m", "ckptavg", "trajectory", run, *schedule, "--out", "two", "-q",
                         cwd=tmp_path))
    assert [code for code, _ in said] == [0, 0], said
    assert "output(s) written" in said[0][1] and "written" not in said[1][1]
    ones = sorted((tmp_path / "one").rglob("ckptavg.json"))
    twos = sorted((tmp_path / "two").rglob("ckptavg.json"))
    assert [p.relative_to(tmp_path / "one") for p in ones] == [p.relative_to(tmp_path / "two") for p in twos]
    assert len(twos) == 2 and all(json.loads(p.read_text())["ranks"] == 2 for p in twos)
    for a, b in zip(ones, twos, strict=True):
        want, got = _tensors(a.parent), _tensors(b.parent)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    said = finish(launch(2, sys.executable, "-m", "ckptavg", "interpolate", three[0], three[2], "--alphas", "0.3,0.7",
                         "--out", "lmc", "-q", cwd=tmp_path))
    assert [code for code, _ in said] == [0, 0], said
    from ckptavg.engine.average import average_in_memory

    for alpha in (0.3, 0.7):
        want = average_in_memory([three[0], three[2]], weights=[alpha, 1 - alpha], normalize=False)
        got = _tensors(tmp_path / "lmc" / f"alpha{alpha:g}")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


TWO_AVERAGES = """
import sys
from ckptavg.engine.average import average_checkpoints
from ckptavg.engine.ranks import from_environment

*inputs, out = sys.argv[1:]
for name in ("a", "b"):  # two groups, one after the other, on the same port
    average_checkpoints(inputs, f"{out}/{name}", ranks=from_environment(), timeout=30)
"""


@pytest.mark.slow
def test_a_script_that_averages_twice_on_ranks_joins_twice(three, tmp_path):
    said = finish(launch(2, sys.executable, "-c", TWO_AVERAGES, *three, tmp_path / "out", cwd=tmp_path))
    assert [code for code, _ in said] == [0, 0], said
    for name in ("a", "b"):
        assert_matches(tmp_path / "out" / name, reference_average(three), max_ulp=0)


@pytest.mark.slow
def test_executor_slurm_submits_one_average_as_a_job_of_ranks(three, tmp_path, slurm):
    """From the login node: one sbatch job (submitit) of 1 node x 2 tasks, every task a rank."""
    out = tmp_path / "avg"
    r = subprocess.run([sys.executable, "-m", "ckptavg", "average", *map(str, three), "--out", str(out), "--executor",
                        "slurm", "--partition", "debug", "--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task",
                        "1", "--time-min", "10"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, SLURM_CONF=str(slurm.conf), PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks, Slurm job" in r.stdout + r.stderr
    assert json.loads((out / "ckptavg.json").read_text())["ranks"] == 2
    assert_matches(out, reference_average(three), max_ulp=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10" + b"\0" * 15)  # a header longer than the file
    r = subprocess.run([sys.executable, "-m", "ckptavg", "average", str(three[0]), str(bad), "--out", "avg2",
                        "--executor", "slurm", "--partition", "debug", "--nodes", "1", "--tasks-per-node", "2",
                        "--cpus-per-task", "1", "--time-min", "10"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=dict(os.environ, SLURM_CONF=str(slurm.conf),
                                              PYTHONPATH=os.pathsep.join(sys.path)))
    said = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(said) == 1 and "failed" in said[0] and "bad/model.safetensors" in said[0], said
    assert not (tmp_path / "avg2").exists()


@pytest.mark.slow
def test_executor_slurm_runs_a_trajectory_command_as_a_job_of_ranks(three, tmp_path, slurm):
    """`ckptavg trajectory ... --executor slurm`: the command line itself, less the job's options, in every task."""
    run, schedule = one_process_trajectory(three, tmp_path)
    r = subprocess.run([sys.executable, "-m", "ckptavg", "trajectory", "run", *schedule, "--out", "two", "-q",
                        "--executor=slurm", "--partition", "debug", "--nodes", "1", "--tasks-per-node", "2",
                        "--cpus-per-task", "1", "--time-min", "10"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=dict(os.environ, SLURM_CONF=str(slurm.conf),
                                              PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 output(s) written under two" in r.stderr and "2 ranks)" in r.stderr, r.stderr
    ones = sorted((tmp_path / "one").rglob("ckptavg.json"))
    twos = sorted((tmp_path / "two").rglob("ckptavg.json"))
    assert len(twos) == 2 and all(json.loads(p.read_text())["ranks"] == 2 for p in twos)
    for a, b in zip(ones, twos, strict=True):
        want, got = _tensors(a.parent), _tensors(b.parent)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_submitted_command_line_loses_only_the_job_s_options():
    from ckptavg.api.cluster import without_job_options

    argv = ["trajectory", "run", "--k", "2", "--executor", "slurm", "--nodes=4", "--tasks-per-node", "8", "--sbatch",
            "account=x", "--out", "o", "--mem", "64G", "-q"]
    assert without_job_options(argv) == ["trajectory", "run", "--k", "2", "--out", "o", "-q"]


@pytest.mark.slow
def test_a_job_slurm_will_not_take_is_one_line_and_nothing_queued(three, tmp_path, slurm):
    r = subprocess.run([sys.executable, "-m", "ckptavg", "average", *map(str, three), "--out", "avg", "--executor",
                        "slurm", "--partition", "no-such-partition", "--nodes", "1", "--tasks-per-node", "2"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=dict(os.environ, SLURM_CONF=str(slurm.conf), PYTHONPATH=os.pathsep.join(sys.path)))
    said = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(said) == 1 and "Slurm did not take the job" in said[0], said
    assert not (tmp_path / "avg").exists()


RAISES_MID_WRITE = """
import sys
from ckptavg.engine.average import average_checkpoints
from ckptavg.engine.ranks import from_environment

def broken(plan):
    def report(nbytes):
        raise ValueError("a bug in a progress hook")
    return report

average_checkpoints(sys.argv[1:-1], sys.argv[-1], ranks=from_environment(), timeout=120, progress=broken)
"""


@pytest.mark.slow
def test_a_bug_on_one_rank_stops_the_others_at_once_not_after_the_timeout(three, tmp_path):
    started = time.monotonic()
    said = finish(launch(2, sys.executable, "-m", "ckptavg", "average", *three, "--out", "avg", "--timeout", "120",
                         cwd=tmp_path, rank_args={1: [sys.executable, "-c", RAISES_MID_WRITE, *three, "avg"]}))
    assert time.monotonic() - started < 60  # (a silent rank would have taken the 120 s)
    assert said[0][0] == 2 and "error: rank 1 of 2 failed: ValueError: a bug in a progress hook" in said[0][1], said
    assert "Traceback" in said[1][1] and said[1][0] == 1  # (the bug keeps its traceback where it happened)
    assert not (tmp_path / "avg").exists()
