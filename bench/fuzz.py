"""The fuzz suite at length, before a release: `tests/fuzzing.py` with more cases per format (the tests run
300), in a process of its own under an address-space limit, and a table of what came of them.

    python bench/fuzz.py --cases 5000 [--seed 1] [--formats safetensors,dcp] [--memory-gib 4]

Exit status 1 when any case failed (a traceback, a wrong average, a file outside opened, a torch class
changed, planted code run); each failure is printed with the mutation that caused it. Record the counts in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000, help="cases per format")
    parser.add_argument("--seed", type=int, default=1, help="the tests use seed 0")
    parser.add_argument("--formats", default="safetensors,sharded,bin,lightning,dcp")
    parser.add_argument("--memory-gib", type=float, default=4.0)
    args = parser.parse_args()
    started = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzzing.py"), "--cases", str(args.cases), "--seed",
                        str(args.seed), "--formats", args.formats, "--memory-gib", str(args.memory_gib)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    reports = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    print(f"{'format':<12} {'cases':>7} {'refused':>8} {'accepted':>9} {'beside model':>13} {'failures':>9}")
    for x in reports:
        print(f"{x['format']:<12} {x['cases']:>7} {x['refused']:>8} {x['accepted']:>9} {x['beside the model']:>13} "
              f"{len(x['failures']):>9}")
        for f in x["failures"]:
            print(f"  case {f['case']} ({f['mutation']}): {f['failure'][-400:]}")
    print(f"{time.time() - started:.0f} s, seed {args.seed}, address space limited to {args.memory_gib} GiB")
    if r.returncode not in (0, 1) or len(reports) != len(args.formats.split(",")):
        print(r.stderr[-3000:], file=sys.stderr)
        return 2
    return 1 if any(x["failures"] for x in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
