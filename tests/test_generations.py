"""Trajectories that mix checkpoint generations: old `.bin` files carrying Pythia's non-trained buffers
(causal masks, masked_bias, rotary inv_freq, an int64 counter) beside safetensors files without them.

Buffers may be absent from some inputs; the output holds one exactly when the newest input does
(copied from it), and the manifest says which inputs lacked what. A trained tensor missing anywhere
stays an error. The Hub side of this (the `pythia` command) is in test_hub.py, whose served repo
alternates the same way.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    assert_loads_in_transformers,
    assert_matches,
    assert_user_error,
    cli,
    load_reference,
    pythia_state_dict,
    reference_average,
    write_checkpoint,
)

STEPS = list(range(1000, 9000, 1000))
# old generation (with buffers) and new (without), alternating, single and sharded
LAYOUTS = [("bin", True), ("safetensors", False), ("bin-sharded", True), ("safetensors-sharded", False)]
BUFFERS = {f"gpt_neox.layers.{i}.attention.{b}" for i in range(2)
           for b in ("bias", "masked_bias", "rotary_emb.inv_freq")} | {"gpt_neox.step_counter"}



def has_buffers(step: int) -> bool:
    return LAYOUTS[STEPS.index(step) % 4][1]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed") / "mixed-run"
    for i, step in enumerate(STEPS):
        fmt, buffers = LAYOUTS[i % 4]
        write_checkpoint(root / f"step{step}", pythia_state_dict(i, torch.float16, buffers=buffers), fmt)
    return root


def test_trajectory_over_mixed_generations(mixed, tmp_path):
    r = cli("trajectory", mixed, "--k", 3, "--nu", 1000, "--interval", 1000, "--out", tmp_path, "-q")
    assert r.exit_code == 0, r.output
    base = tmp_path / "mixed-run" / "lawa-k3-nu1000"
    for t in range(3000, 9000, 1000):
        members = [t - 2000, t - 1000, t]
        out = base / f"step{t}"
        assert_matches(out, reference_average([mixed / f"step{s}" for s in members]), max_ulp=1)
        got = set(load_reference(out))
        assert (BUFFERS <= got) if has_buffers(t) else not (BUFFERS & got), t
        manifest = json.loads((out / "ckptavg.json").read_text())
        for s, described in zip(members, manifest["inputs"], strict=True):
            lacks = set(described.get("absent_buffers", []))
            assert lacks == (set() if has_buffers(s) else BUFFERS), (t, s)
        if has_buffers(t):
            assert set(manifest["copied_tensors"]) == BUFFERS
        else:
            assert not manifest["copied_tensors"]
    assert_loads_in_transformers(base / "step4000")  # newest without buffers
    assert_loads_in_transformers(base / "step5000")  # newest with them


@pytest.mark.parametrize("newest", [4000, 3000], ids=["newest-without", "newest-with"])
def test_average_command_over_mixed_generations(mixed, tmp_path, newest):
    inputs = [mixed / f"step{s}" for s in (1000, 2000, newest)]
    r = cli("average", *inputs, "--out", tmp_path / "avg", "-q")
    assert r.exit_code == 0, r.output
    assert_matches(tmp_path / "avg", reference_average(inputs), max_ulp=1)
    assert (BUFFERS <= set(load_reference(tmp_path / "avg"))) == has_buffers(newest)
    assert_loads_in_transformers(tmp_path / "avg")


def test_a_trained_tensor_missing_is_still_an_error(mixed, tmp_path):
    sd = pythia_state_dict(9, torch.float16, buffers=False)
    del sd["gpt_neox.layers.1.attention.dense.weight"]
    lacking = write_checkpoint(tmp_path / "lacking", sd, "safetensors")
    out = tmp_path / "avg"
    assert_user_error(cli("average", mixed / "step1000", lacking, mixed / "step3000", "--out", out),
                      "'gpt_neox.layers.1.attention.dense.weight' is missing from", str(lacking), out=out)
    # the newest input lacking it: named as well
    assert_user_error(cli("average", mixed / "step1000", lacking, "--out", out),
                      "'gpt_neox.layers.1.attention.dense.weight' is in", f"but not in {lacking}", out=out)


def test_copy_pattern_for_an_architectures_own_buffers(mixed, tmp_path):
    """A float buffer no default pattern knows: an error until --copy names it, then copied from the newest."""
    folders = []
    for i, extra in enumerate((True, False, True)):
        sd = pythia_state_dict(20 + i, torch.float16, buffers=False)
        if extra:
            sd["gpt_neox.layers.0.mlp.lookup_cache"] = torch.full((4,), float(i))
        folders.append(write_checkpoint(tmp_path / f"c{i}", sd, "safetensors"))
    out = tmp_path / "avg"
    assert_user_error(cli("average", *folders, "--out", out), "'gpt_neox.layers.0.mlp.lookup_cache'", out=out)
    r = cli("average", *folders, "--out", out, "--copy", "*.lookup_cache", "-q")
    assert r.exit_code == 0, r.output
    got = load_reference(out)
    assert torch.equal(got["gpt_neox.layers.0.mlp.lookup_cache"], torch.full((4,), 2.0))
    manifest = json.loads((out / "ckptavg.json").read_text())
    assert "*.lookup_cache" in manifest["dtype_policy"]["copy_patterns"]
    assert manifest["inputs"][1]["absent_buffers"] == ["gpt_neox.layers.0.mlp.lookup_cache"]
    assert manifest["copied_tensors"]["gpt_neox.layers.0.mlp.lookup_cache"] == "non-trained buffer, not averaged"
    assert_matches(out, reference_average(folders, copy=("lookup_cache",)), max_ulp=1)
