"""Where an average's time goes: wall time, process CPU and each pipeline stage's thread CPU.

Runs `average_checkpoints` in a fresh process per measurement, on bench/average.py's synthetic inputs
(build them with `python bench/average.py --cases CASE --reps 0`), warm or cold (the page cache dropped
first: root only), with or without input hashing, and alternates between ckptavg checkouts (--roots) so
that two versions are compared in the same runs. A stage's CPU is its threads' user + system time:
`_read` (the reader), `_write`, `_hash` (all hashing threads together) and the arithmetic (its
coordinating thread, and in checkouts before the engine ran every stage in its own thread, the caller's;
on more than 3 cores its helper threads are not counted). Page faults are the process's.

    python bench/stages.py [--case 1b] [--modes warm,cold] [--hash both] [--reps 2] [--roots .,/tmp/base]
                           [--buffered-writes] [--probe]

It wraps two private methods of the engine (`_Pipeline._guard` and `_Pipeline.run`): a tool for
engine work, not an API.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import collections, os, resource, shutil, sys, tempfile, time
from pathlib import Path
folders = [Path(p) for p in sys.argv[1].split(",")]
mode, hashed, buffered = sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
from ckptavg.engine import pipeline, writer
from ckptavg.engine.average import average_checkpoints
cpu = collections.Counter()
guard, run = pipeline._Pipeline._guard, pipeline._Pipeline.run
def timed_guard(self, fn):
    inner = guard(self, fn)
    def stage():
        t = time.thread_time(); inner(); cpu[fn.__name__.strip("_")] += time.thread_time() - t
    return stage
def timed_run(self):
    t = time.thread_time(); run(self); cpu["arithmetic"] += time.thread_time() - t
pipeline._Pipeline._guard, pipeline._Pipeline.run = timed_guard, timed_run
if buffered:
    init = writer.ShardFile.__init__
    writer.ShardFile.__init__ = lambda self, path, shard, **kw: init(self, path, shard, **{**kw, "direct": False})
sys.path.insert(0, sys.argv[5])  # this bench folder, whatever checkout PYTHONPATH names
from average import drop_caches, floor_read
if mode == "cold":
    drop_caches()
else:
    floor_read([w for f in folders for w in f.glob("*.safetensors")])
work = Path(tempfile.mkdtemp(dir=folders[0].parent.parent))
os.environ["CKPTAVG_CACHE"] = str(work / "hash-cache")
r0, t0, p0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
try:
    average_checkpoints(folders, work / "avg", device="cpu", hash_inputs=hashed)
    wall, proc, r1 = time.perf_counter() - t0, time.process_time() - p0, resource.getrusage(resource.RUSAGE_SELF)
finally:
    shutil.rmtree(work, ignore_errors=True)
stages = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
print(f"wall {wall:6.2f} s, cpu {proc:6.2f} s ({stages}); faults {r1.ru_minflt - r0.ru_minflt} minor, "
      f"{r1.ru_majflt - r0.ru_majflt} major")
"""


PROBE = r"""
import hashlib, os, time
import numpy as np
buf = os.urandom(256 << 20)
t = time.thread_time(); hashlib.sha256(buf).digest(); sha = time.thread_time() - t
a = np.ones(1 << 27)  # 1 GiB of float64
t = time.perf_counter(); b = a.copy(); a += b; copy = time.perf_counter() - t
print(f"probe: sha256 {0.25 / sha:.2f} GiB/s, memory {3 / copy:.1f} GiB/s")
"""


def probe() -> str:
    """How fast this machine is right now, apart from ckptavg: one core's sha256 and the memory's streaming
    speed. On a shared machine both move between repetitions; an average's CPU time moves with them."""
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else f"probe failed: {r.stderr[-200:]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "data")
    ap.add_argument("--case", default="1b", choices=["1b", "12b"], help="k=5 inputs of bench/average.py's case")
    ap.add_argument("--modes", default="warm,cold")
    ap.add_argument("--hash", default="both", choices=["both", "yes", "no"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--roots", default=str(ROOT), help="comma-separated ckptavg checkouts, alternated")
    ap.add_argument("--buffered-writes", action="store_true", help="write through the page cache, not O_DIRECT")
    ap.add_argument("--probe", action="store_true", help="before each run, time a sha256 and a memory-streaming "
                    "probe: whether the machine itself was slower in a slow repetition")
    args = ap.parse_args()
    shape = {"1b": "pythia-1b", "12b": "pythia-12b-2-layers"}[args.case]
    folders = [args.data.resolve() / shape / f"step{1000 * (i + 1)}" for i in range(5)]
    missing = [f for f in folders if not (f / "model.safetensors").is_file()]
    if missing:
        sys.exit(f"{missing[0]} is missing: build it with python bench/average.py --cases {args.case} --reps 0")
    roots = [Path(r).resolve() for r in args.roots.split(",")]
    hashes = {"both": [False, True], "yes": [True], "no": [False]}[args.hash]
    for rep in range(args.reps):
        for mode in args.modes.split(","):
            for hashed in hashes:
                for root in roots:
                    if args.probe:
                        print(f"rep {rep + 1} {mode} {'hashed' if hashed else 'no hash'} {probe()}", flush=True)
                    # run outside any checkout: the working folder would shadow PYTHONPATH's ckptavg
                    r = subprocess.run([sys.executable, "-c", CHILD, ",".join(map(str, folders)), mode,
                                        str(int(hashed)), str(int(args.buffered_writes)), str(ROOT / "bench")],
                                       env=dict(os.environ, PYTHONPATH=str(root)), cwd="/",
                                       capture_output=True, text=True)
                    line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 else f"failed: {r.stderr[-500:]}"
                    print(f"rep {rep + 1} {mode} {'hashed' if hashed else 'no hash'} {root}: {line}", flush=True)


if __name__ == "__main__":
    main()
