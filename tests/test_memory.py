"""Peak anonymous memory stays O(largest tensor), however large the inputs are in total."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_checkpoint

TENSORS = 24
ELEMS = 1 << 20  # largest tensor: 4 MiB of float32
INPUTS = 4  # 4 x 96 MiB = 384 MiB of inputs
PIECE = 1 << 18

PROBE = r"""
import json, sys, threading, time
import torch
from ckptavg.engine.average import average_checkpoints

def rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.0005)

*inputs, out, piece = sys.argv[1:]
base = rss_anon()
t = threading.Thread(target=sample, daemon=True)
t.start()
average_checkpoints(inputs, out, device="cpu", hash_inputs=False, piece_elements=int(piece))
done.set(); t.join()
peak[0] = max(peak[0], rss_anon())
print(json.dumps({"base": base, "peak": peak[0]}))
"""


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    made = {}
    for fmt in ("safetensors", "bin"):
        made[fmt] = []
        for i in range(INPUTS):
            g = torch.Generator().manual_seed(i)
            sd = {f"layer.{j}.weight": torch.randn(ELEMS, generator=g) for j in range(TENSORS)}
            made[fmt].append(write_checkpoint(root / fmt / f"step{i}", sd, fmt))
    return made


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_peak_anonymous_memory_is_bounded_by_the_largest_tensor(big_inputs, tmp_path, fmt):
    inputs = big_inputs[fmt]
    total = sum(f.stat().st_size for d in inputs for f in d.iterdir() if f.suffix in (".safetensors", ".bin"))
    largest = ELEMS * 4
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, inputs), str(tmp_path / "avg"), str(PIECE)],
                          capture_output=True, text=True, env=env, check=True)
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = m["peak"] - m["base"]
    budget = 3 * largest + 32 * 2**20  # a few tensors plus the fixed pools (about 17 MiB at this piece size)
    assert total > 8 * budget  # the inputs could not fit in the budget
    print(f"{fmt}: RssAnon grew {grown / 2**20:.1f} MiB for {total / 2**20:.0f} MiB of inputs")
    assert grown < budget, f"RssAnon grew by {grown / 2**20:.1f} MiB; budget {budget / 2**20:.1f} MiB"
    assert (tmp_path / "avg" / "ckptavg.json").is_file()
