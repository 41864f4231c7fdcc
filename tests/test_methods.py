"""The weighting schemes of 2025-26 (WMA, decay-shaped merges, EMA inside a window): weights against values
worked by hand, outputs against the float64 reference on a trajectory that mixes checkpoint generations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_matches, cli, load_reference, pythia_state_dict, reference_average, write_checkpoint

from ckptavg.errors import ScheduleError
from ckptavg.trajectory.methods import METHODS
from ckptavg.trajectory.schedule import DECAY_SHAPES, decay_weights, ema_window_weights, wma_weights

STEPS = list(range(1000, 7000, 1000))
WINDOW = ("--k", 3, "--nu", 1000, "--interval", 1000, "--start", 3000, "--end", 6000, "-q")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Old `.bin` checkpoints with Pythia's buffers alternating with safetensors without them."""
    root = tmp_path_factory.mktemp("methods") / "run"
    for i, step in enumerate(STEPS):
        old = i % 2 == 0
        write_checkpoint(root / f"step{step}", pythia_state_dict(i, torch.float16, buffers=old),
                         "bin-sharded" if old else "safetensors")
    return root


def test_weights_against_values_worked_by_hand():
    assert wma_weights(4) == [0.1, 0.2, 0.3, 0.4]
    assert ema_window_weights(3, 0.5) == [0.25, 0.25, 0.5]
    assert decay_weights(5, "linear") == [0.2] * 5  # linear decay is LAWA, exactly
    assert decay_weights(2, "cosine") == pytest.approx([0.5, 0.5])
    c = (1 + math.cos(math.pi / 4)) / 2  # f(1/4) of the cosine shape, 0.8536
    assert decay_weights(4, "cosine") == pytest.approx([1 - c, c - 0.5, 0.5 - (1 - c), 1 - c])
    assert decay_weights(4, "1-sqrt") == pytest.approx([0.5, math.sqrt(0.5) - 0.5, math.sqrt(0.75) - math.sqrt(0.5),
                                                       1 - math.sqrt(0.75)])
    for shape, f in DECAY_SHAPES.items():
        w = decay_weights(7, shape)
        assert math.fsum(w) == pytest.approx(1.0)
        # WSM: the tail sums are the decay shape itself, the learning-rate multiplier of each update
        assert [math.fsum(w[j:]) for j in range(1, 7)] == pytest.approx([f(j / 7) for j in range(1, 7)])
    with pytest.raises(ScheduleError, match="unknown decay shape"):
        decay_weights(3, "exp")


@pytest.mark.parametrize("args, tag, weights", [
    (("--method", "wma"), "wma-k3-nu1000", wma_weights(3)),
    (("--method", "decay", "--decay-shape", "cosine"), "decay-cosine-k3-nu1000", decay_weights(3, "cosine")),
    (("--method", "decay", "--decay-shape", "1-sqrt"), "decay-1sqrt-k3-nu1000", decay_weights(3, "1-sqrt")),
    (("--method", "ema-window", "--ema-alpha", "0.5"), "ema-window-alpha0.5-k3-nu1000", ema_window_weights(3, 0.5)),
])
def test_each_method_matches_the_float64_reference_on_mixed_generations(mixed, tmp_path, args, tag, weights):
    r = cli("trajectory", mixed, *WINDOW, *args, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    for t in range(3000, 7000, 1000):
        out = tmp_path / "run" / tag / f"step{t}"
        members = [mixed / f"step{s}" for s in (t - 2000, t - 1000, t)]
        assert_matches(out, reference_average(members, weights), max_ulp=2)
        manifest = json.loads((out / "ckptavg.json").read_text())
        assert manifest["weights"] == weights and manifest["run"]["tag"] == tag
        assert manifest["method"]["name"] == args[1]


def test_linear_decay_is_lawa_bit_for_bit(mixed, tmp_path):
    assert cli("trajectory", mixed, *WINDOW, "--out", tmp_path).exit_code == 0
    r = cli("trajectory", mixed, *WINDOW, "--method", "decay", "--decay-shape", "linear", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    for t in range(3000, 7000, 1000):
        lawa = load_reference(tmp_path / "run" / "lawa-k3-nu1000" / f"step{t}")
        decay = load_reference(tmp_path / "run" / "decay-linear-k3-nu1000" / f"step{t}")
        assert lawa.keys() == decay.keys() and all(torch.equal(lawa[k], decay[k]) for k in lawa)


def test_method_errors_and_the_registry_in_help_and_study_files(mixed, tmp_path):
    r = cli("trajectory", mixed, *WINDOW, "--method", "decay", "--decay-shape", "exp", "--out", tmp_path)
    assert r.exit_code == 2 and "unknown --decay-shape 'exp'" in r.output and not (tmp_path / "run").exists()
    r = cli("trajectory", "--help")
    assert all(name in " ".join(r.output.split()) for name in METHODS)
    study = tmp_path / "s.toml"
    study.write_text(f'out = "o"\n[steps]\ninterval = 1000\nstart = 3000\n[[sources]]\nlocal = "{mixed}"\n'
                     '[[runs]]\nmethod = "decay"\nk = 3\nnu = 1000\ndecay_shape = ["linear", "1-sqrt"]\n'
                     '[[runs]]\nmethod = "wma"\nk = 3\nnu = 1000\n')
    r = cli("study", "plan", study, "--root", tmp_path)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "runs *-k3-nu1000" in text  # (what the runs share, said once in the title)
    assert all(f" {run} " in text for run in ("decay-linear", "decay-1sqrt", "wma")), text


def test_windows_in_tokens():
    from ckptavg.trajectory.schedule import steps_for_tokens
    from ckptavg.units import parse_tokens

    assert parse_tokens("4B") == 4 * 10**9 and parse_tokens("500M") == 5 * 10**8 and parse_tokens("2.5T") == 25 * 10**11
    assert parse_tokens("2097152000") == 2_097_152_000
    for bad in ("", "4X", "-1B", "0"):
        with pytest.raises(ValueError):
            parse_tokens(bad)
    assert steps_for_tokens(2_097_152_000, 2_097_152, "--nu-tokens") == 1000
    with pytest.raises(ScheduleError, match=r"the nearest are 1,998,585,856 \(953 steps\) and 2,000,683,008 \(954"):
        steps_for_tokens(2 * 10**9, 2_097_152, "--nu-tokens")


def test_pythia_windows_in_tokens_plan_like_steps(tmp_path):
    steps = cli("pythia", "--model", "1b", "--k", 3, "--nu", 1000, "--interval", 3000, "--dry-run", "--out", tmp_path)
    tokens = cli("pythia", "--model", "1b", "--k", 3, "--nu-tokens", "2.097152B", "--interval-tokens", "6291456000",
                 "--dry-run", "--out", tmp_path)
    assert steps.exit_code == tokens.exit_code == 0, tokens.output
    assert "41 window(s) to average" in tokens.output and "44B" in tokens.output  # step 21000 = 44.0B tokens
    summary = [line for line in tokens.output.splitlines() if "window(s) to average" in line]
    assert summary == [line for line in steps.output.splitlines() if "window(s) to average" in line]
    r = cli("pythia", "--model", "1b", "--nu-tokens", "2B", "--dry-run", "--out", tmp_path)
    assert r.exit_code == 2 and "not a whole number" in r.output


def test_manifest_counts_in_tokens_when_it_knows_them(mixed, tmp_path):
    r = cli("trajectory", mixed, *WINDOW, "--tokens-per-step", 1000, "--nu-tokens", "1M", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    method = json.loads((tmp_path / "run" / "lawa-k3-nu1000" / "step4000" / "ckptavg.json").read_text())["method"]
    assert method["nu"] == 1000 and method["nu_tokens"] == 10**6 and method["step_tokens"] == 4 * 10**6
    r = cli("trajectory", mixed, *WINDOW, "--nu-tokens", "1M", "--out", tmp_path)
    assert r.exit_code == 2 and "needs --tokens-per-step" in r.output
