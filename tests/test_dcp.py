"""`torch.distributed.checkpoint` folders as inputs, written by DCP's own writer (`dcp.save`, which the
trainers' checkpointers call; sharded by three gloo ranks in `dcpsave.py`), against the float64 mean of
what DCP's own loader gives back."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import cli, load_reference
from dcpsave import SHARDED_ROWS, model_state

from ckptavg.engine.average import average_checkpoints
from ckptavg.errors import CorruptCheckpointError, InputError, UnsafeCheckpointError
from ckptavg.manifest import MANIFEST

dcp = pytest.importorskip("torch.distributed.checkpoint")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def save(folder, seed: int):
    """A trainer's save: the model, its optimizer's moments and non-tensor training state."""
    sd = {k: v.clone() for k, v in model_state(seed).items()}
    sd["optim.state.model.blocks.0.norm.weight.exp_avg"] = torch.randn(32)
    sd["train_state"] = {"step": seed, "tokens": 1000 * seed}
    dcp.save(sd, checkpoint_id=str(folder), no_dist=True)
    return folder


def load_back(folder, rows: int = 48) -> dict:
    """What DCP's own loader gives for the model tensors."""
    sd = {k: torch.empty_like(v) for k, v in model_state(0, rows).items()}
    dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    return sd


def assert_is_the_mean_of_what_dcp_loads(out, folders, rows: int = 48) -> None:
    """The output holds the model tensors only (no optimizer moments, no training state), each the float64
    mean of what dcp.load gives cast once, and non-float ones copied from the newest."""
    got = load_reference(out)
    loaded = [load_back(f, rows) for f in folders]
    assert set(got) == set(loaded[0])
    for name, newest in loaded[-1].items():
        if newest.is_floating_point():
            want = (sum(sd[name].double() for sd in loaded) / len(loaded)).to(newest.dtype)
        else:
            want = newest  # never averaged: copied from the newest
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), (out, name)


def saved_by_three_ranks(root: Path, seeds, **env) -> list[Path]:
    """root/stepSEED/ for each seed, as three gloo ranks save it (dcpsave.py; `env` picks its variant)."""
    import os
    import subprocess
    import sys

    saver = Path(__file__).with_name("dcpsave.py")
    r = subprocess.run([sys.executable, str(saver), str(root), "3", *map(str, seeds)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env))
    assert r.returncode == 0, r.stderr[-3000:]
    return [root / f"step{s}" for s in seeds]


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    return [save(root / f"step{s}", s) for s in (1, 2, 3)]


def test_dcp_checkpoints_average_to_the_float64_mean_of_what_dcp_loads(trajectory, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    out = average_checkpoints(trajectory, tmp_path / "avg", device="cpu")
    assert_is_the_mean_of_what_dcp_loads(out, trajectory)
    manifest = json.loads((out / MANIFEST).read_text())
    assert {i["format"] for i in manifest["inputs"]} == {"dcp"}
    files = [(Path(r["path"]) / f["name"], f["sha256"]) for r in manifest["inputs"] for f in r["files"]]
    assert files and all(hashlib.sha256(path.read_bytes()).hexdigest() == digest for path, digest in files)
    assert set(manifest["copied_tensors"]) == {"model.steps_seen"}


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_a_metadata_pickle_asking_for_anything_else_is_refused_and_never_runs(trajectory, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "hostile"
    shutil.copytree(trajectory[0], hostile)
    (hostile / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle posix.system"):
        average_checkpoints([hostile, trajectory[1]], tmp_path / "avg", device="cpu")
    r = cli("average", hostile, trajectory[1], "--out", tmp_path / "avg")
    assert r.exit_code == 2 and "refusing to unpickle" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "avg").exists()


def test_a_truncated_or_missing_distcp_file_is_named_before_anything_is_written(trajectory, tmp_path):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(trajectory[0], cut)
    (data,) = cut.glob("*.distcp")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated|not a readable tensor"):
        average_checkpoints([cut, trajectory[1]], tmp_path / "avg", device="cpu")
    data.unlink()
    with pytest.raises(CorruptCheckpointError, match="is missing"):
        average_checkpoints([cut, trajectory[1]], tmp_path / "avg", device="cpu")
    assert not (tmp_path / "avg").exists()


def test_a_folder_without_model_tensors_is_an_input_error(tmp_path):
    dcp.save({"optim.state.x.exp_avg": torch.randn(3), "train_state": {"step": 1}},
             checkpoint_id=str(tmp_path / "optim-only"), no_dist=True)
    with pytest.raises(InputError, match="without model tensors"):
        average_checkpoints([tmp_path / "optim-only"] * 2, tmp_path / "avg", device="cpu")


def test_a_trajectory_of_dcp_steps_in_olmo_core_s_layout_averages_its_windows(tmp_path):
    """Steps saved as OLMo-core lays them out (stepN/model_and_optim/ holds the DCP folder; stepN-merged is
    not a step): `ckptavg trajectory` finds them without flags, checks them for duplicates, and each
    window is the float64 mean of what dcp.load gives."""
    import shutil

    run = tmp_path / "run"
    for s in (1000, 2000, 3000):
        save(run / f"step{s}" / "model_and_optim", s)
    shutil.copytree(run / "step3000", run / "step3000-merged")
    r = cli("trajectory", run, "--k", 2, "--nu", 1000, "--interval", 1000, "--start", 2000, "--out",
            tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    outs = sorted((tmp_path / "out").rglob(MANIFEST))
    assert [p.parent.name for p in outs] == ["step2000", "step3000"]
    for manifest in outs:
        t = int(manifest.parent.name.removeprefix("step"))
        assert_is_the_mean_of_what_dcp_loads(manifest.parent, [run / f"step{s}" / "model_and_optim"
                                                               for s in (t - 1000, t)])
    shutil.copytree(run / "step3000", run / "step4000")  # a step saved twice, byte for byte
    r = cli("trajectory", run, "--k", 2, "--nu", 1000, "--interval", 1000, "--start", 4000, "--out",
            tmp_path / "out", "-q")
    assert "step3000, step4000 share weights byte for byte" in " ".join(r.stderr.split())



def test_a_row_sharded_save_from_three_ranks_averages_to_the_mean_of_what_dcp_loads(tmp_path, monkeypatch):
    """Three gloo ranks save each weight as DTensor Shard(0) chunks (uneven: 47 rows over 3), as FSDP does:
    the chunks are assembled straight into the average, which equals the float64 mean of dcp.load's."""
    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    steps = saved_by_three_ranks(tmp_path / "run", (1, 2, 3))
    assert len(list(steps[0].glob("*.distcp"))) == 3
    out = average_checkpoints(steps, tmp_path / "avg", device="cpu", piece_elements=100)
    assert_is_the_mean_of_what_dcp_loads(out, steps, SHARDED_ROWS)
    manifest = json.loads((out / MANIFEST).read_text())
    files = [(Path(i["path"]) / f["name"], f["sha256"]) for i in manifest["inputs"] for f in i["files"]]
    assert len(files) == 9 and all(hashlib.sha256(p.read_bytes()).hexdigest() == d for p, d in files)

    (steps[0] / "__2_0.distcp").unlink()  # one rank's file lost
    with pytest.raises(CorruptCheckpointError, match="is missing"):
        average_checkpoints(steps, tmp_path / "avg2", device="cpu")


def test_a_save_without_collectives_has_its_ranks_metadata_merged_or_is_refused(tmp_path, monkeypatch):
    """`use_collectives=False` leaves a `__R.metadata` per rank and no `.metadata` (dcp.load in one process
    would fill rank 0's chunks only): merged, the average is the float64 mean of the saved tensors; with
    a rank's metadata gone, it is refused."""
    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    steps = saved_by_three_ranks(tmp_path / "run", (1, 2), DCPSAVE_NO_COLLECTIVES="1")
    assert not (steps[0] / ".metadata").exists() and len(list(steps[0].glob("__*.metadata"))) == 3
    out = average_checkpoints(steps, tmp_path / "avg", device="cpu")
    got = load_reference(out)
    saved = [model_state(s, SHARDED_ROWS) for s in (1, 2)]
    assert set(got) == set(saved[0])
    for name, newest in saved[-1].items():
        want = (sum(sd[name].double() for sd in saved) / 2).to(newest.dtype) if newest.is_floating_point() else newest
        assert torch.equal(got[name], want), name

    (steps[0] / "__1.metadata").unlink()
    with pytest.raises(CorruptCheckpointError, match="rank 1 left no __1.metadata"):
        average_checkpoints(steps, tmp_path / "avg2", device="cpu")


def test_tensor_parallel_column_shards_are_read_row_by_row(tmp_path, monkeypatch):
    """Each tensor sharded on its last dimension over three ranks (uneven: 32 columns as 11, 11, 10), as
    tensor parallelism saves row-parallel weights: every chunk is a range per row, and the average is the
    float64 mean of what dcp.load gives."""
    monkeypatch.setenv("CKPTAVG_CACHE", str(tmp_path / "cache"))
    steps = saved_by_three_ranks(tmp_path / "run", (1, 2), DCPSAVE_COLUMNS="1")
    out = average_checkpoints(steps, tmp_path / "avg", device="cpu", piece_elements=16)
    assert_is_the_mean_of_what_dcp_loads(out, steps, SHARDED_ROWS)
