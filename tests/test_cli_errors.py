"""Bad input: one line on stderr, exit code 2, no traceback, and nothing left in the output's place."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import assert_user_error, cli, pythia_state_dict, write_checkpoint
from safetensors.torch import save_file


@pytest.fixture
def pair(ckpts):
    return ckpts("float16", "safetensors", n=2)


def test_missing_input(pair, tmp_path):
    out = tmp_path / "avg"
    assert_user_error(cli("average", pair[0], tmp_path / "nope", "--out", out), "nope", "no such", out=out)


def test_unknown_format(pair, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    out = tmp_path / "avg"
    assert_user_error(cli("average", pair[0], empty, "--out", out), "no weights found", out=out)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    assert_user_error(cli("average", pair[0], odd, "--out", out), "unknown checkpoint format", out=out)


def test_tensor_missing_from_one_input(pair, tmp_path):
    sd = pythia_state_dict(5, torch.float16)
    del sd["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    other = write_checkpoint(tmp_path / "other", sd, "safetensors")
    out = tmp_path / "avg"
    assert_user_error(cli("average", other, pair[1], "--out", out),
                      "gpt_neox.layers.1.mlp.dense_4h_to_h.bias", str(other), out=out)


def test_shape_mismatch(pair, tmp_path):
    sd = pythia_state_dict(5, torch.float16)
    sd["embed_out.weight"] = sd["embed_out.weight"][:100].contiguous()
    other = write_checkpoint(tmp_path / "other", sd, "bin")
    out = tmp_path / "avg"
    assert_user_error(cli("average", other, pair[1], "--out", out),
                      "embed_out.weight", "shape", str(other), str(pair[1]), out=out)


def test_dtype_family_mismatch(pair, tmp_path):
    sd = pythia_state_dict(5, torch.float16)
    sd["embed_out.weight"] = sd["embed_out.weight"].to(torch.int16)
    other = write_checkpoint(tmp_path / "other", sd, "safetensors")
    out = tmp_path / "avg"
    assert_user_error(cli("average", other, pair[1], "--out", out), "embed_out.weight", "int16", out=out)


def test_weights_must_sum_to_one_unless_no_normalize(pair, tmp_path):
    out = tmp_path / "avg"
    assert_user_error(cli("average", *pair, "--out", out, "--weights", "0.5,0.6"), "sum to 1.1", out=out)
    assert_user_error(cli("average", *pair, "--out", out, "--weights", "1"), "1 weights for 2 inputs", out=out)
    assert_user_error(cli("average", *pair, "--out", out, "--weights", "a,b"), "--weights", out=out)
    result = cli("average", *pair, "--out", out, "--weights", "0.5,0.6", "--no-normalize", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "ckptavg.json").read_text())["weights"] == [0.5, 0.6]


def test_unknown_device(pair, tmp_path):
    out = tmp_path / "avg"
    assert_user_error(cli("average", *pair, "--out", out, "--device", "bogus"), "unsupported device 'bogus'",
                      out=out)


def test_existing_output_needs_force(pair, tmp_path):
    out = tmp_path / "avg"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = cli("average", *pair, "--out", out)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "user data"
    result = cli("average", *pair, "--out", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "ckptavg.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg"]


def test_not_enough_disk_space(pair, tmp_path, monkeypatch):
    import ckptavg.engine.writer

    real = shutil.disk_usage
    monkeypatch.setattr(ckptavg.engine.writer.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1000))
    out = tmp_path / "avg"
    assert_user_error(cli("average", *pair, "--out", out), "needed for the output", "free", out=out)


def test_truncated_safetensors(pair, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pair[0], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 100])
    out = tmp_path / "avg"
    assert_user_error(cli("average", bad, pair[1], "--out", out), "truncated", out=out)


def test_corrupt_safetensors_header(pair, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pair[0], bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:20] = b"#" * 12
    (bad / "model.safetensors").write_bytes(bytes(data))
    out = tmp_path / "avg"
    assert_user_error(cli("average", bad, pair[1], "--out", out), "corrupt", out=out)


class Payload:
    """Anything beyond tensors in a pickle needs arbitrary code to load."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_non_zip_pickle_needing_unsafe_unpickling(pair, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with open(bad / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Payload()}, f)
    out = tmp_path / "avg"
    assert_user_error(cli("average", bad, pair[1], "--out", out), "not a torch.save file", out=out)
    torch.save({"w": Payload()}, bad / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # a legacy file
    assert_user_error(cli("average", bad, pair[1], "--out", out), "refusing to unpickle posix.system", out=out)


def test_zip_pickle_needing_unsafe_unpickling(pair, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"w": Payload()}, bad / "pytorch_model.bin")
    out = tmp_path / "avg"
    assert_user_error(cli("average", bad, pair[1], "--out", out), "refusing to unpickle", out=out)


def test_interrupt_leaves_nothing_behind(pair, tmp_path):
    from ckptavg.engine.average import average_checkpoints

    def progress(plan):
        def tick(n):
            raise KeyboardInterrupt
        return tick

    out = tmp_path / "avg"
    with pytest.raises(KeyboardInterrupt):
        average_checkpoints(pair, out, device="cpu", progress=progress)
    assert list(tmp_path.iterdir()) == []


def test_index_naming_missing_shard(ckpts, tmp_path):
    src = ckpts("float16", "safetensors-sharded", n=2)
    bad = tmp_path / "bad"
    shutil.copytree(src[0], bad)
    (bad / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "avg"
    assert_user_error(cli("average", bad, src[1], "--out", out), "missing shard", out=out)


def test_real_process_exit_code_and_no_traceback(pair, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "average", str(pair[0]), str(tmp_path / "x"),
                           "--out", str(tmp_path / "avg")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_safetensors_written_by_us_is_read_by_safetensors(pair, tmp_path):
    """A round trip through the format's own reader, with a dtype-heterogeneous file."""
    from safetensors.torch import load_file

    out = tmp_path / "avg"
    assert cli("average", *pair, "--out", out, "-q").exit_code == 0
    tensors = load_file(out / "model.safetensors")
    assert tensors["gpt_neox.layers.0.attention.bias"].dtype == torch.bool
    save_file(tensors, tmp_path / "again.safetensors")  # and it is an ordinary state dict


def test_a_trajectory_step_whose_shards_are_still_being_written_is_left_out(ckpts, tmp_path):
    """A sharded model folder may have its index before all its shards: in a trajectory, such a step is
    left out with a warning (and never averaged); given to `average` itself, it is an error."""
    from ckptavg.trajectory.sources import LocalTrajectory

    src = ckpts("float16", "safetensors-sharded", n=3)
    run = tmp_path / "run"
    for i, folder in enumerate(src):
        shutil.copytree(folder, run / f"step{1000 * (i + 1)}")
    (run / "step3000" / "model-00002-of-00002.safetensors").unlink()
    with pytest.warns(UserWarning, match="step 3000 left out: .*model-00002-of-00002.safetensors, which is not there"):
        source = LocalTrajectory(run)
    assert source.steps() == [1000, 2000]
