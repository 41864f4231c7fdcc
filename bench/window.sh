#!/usr/bin/env bash
# Sliding windows over a cold trajectory: `ckptavg trajectory` over bench/average.py's ten 1b
# checkpoints (build them with `python3 bench/average.py --cases 1b-k10 --reps 0`), k=5, nu=1000,
# outputs at steps 5000-10000 every INTERVAL steps (1000: six windows that share 4 of their 5 inputs
# with the next; 3000: two windows that share 2), hashed, the page cache dropped before each run (root
# only). The checkouts named are alternated in each repetition, so that two versions of the reader
# are timed under the same disk weather. Prints each run's wall time.
#
# MODE=memory makes each window's average in memory instead (`average_in_memory`, as a study that
# scores as it goes with --in-memory does, the scoring left out) and prints the bytes read from disk
# and the process's CPU time too; INTERVALS picks the intervals (default "1000 3000").
#
#     [MODE=memory] [INTERVALS=1000] bash bench/window.sh [REPS] [CHECKOUT...]
#                                                         (default: 2 repetitions of this checkout)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
reps=${1:-2}
shift || true
checkouts=("${@:-$root}")
data=$root/bench/data
work=$(mktemp -d "$data/window-XXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"  # not a checkout: its folder would shadow PYTHONPATH's ckptavg
# the in-memory run, through the library: a checkout from before f7f70f4 passes no `reread`
memory_run='
import inspect, sys, time
from pathlib import Path
from ckptavg.engine.average import average_in_memory
from ckptavg.trajectory.run import RunSpec, execute_run, plan_run
from ckptavg.trajectory.sources import LocalTrajectory
source = LocalTrajectory(Path(sys.argv[1]))
plan = plan_run(source, RunSpec("lawa", 5, 1000, int(sys.argv[2]), 5000, 10000), Path("out"))
hinted = "reread" in inspect.signature(average_in_memory).parameters
def average(job, folders, reread=()):
    average_in_memory(folders, weights=job.window.weights, device="cpu", **({"reread": reread} if hinted else {}))
start = time.perf_counter()
execute_run(source, plan, in_memory=average)
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
disk = int(io["read_bytes"]) / 1e9
print(f"{time.perf_counter() - start:.1f} s, {disk:.1f} GB from disk, CPU {time.process_time():.1f} s")
'
for rep in $(seq "$reps"); do
    for interval in ${INTERVALS:-1000 3000}; do
        for checkout in "${checkouts[@]}"; do
            rm -rf "$work/out" "$work/cache"
            sync && echo 3 > /proc/sys/vm/drop_caches
            if [ "${MODE:-}" = memory ]; then
                took=$(PYTHONPATH=$checkout python3 -c "$memory_run" "$data/pythia-1b" "$interval")
                printf 'rep %s interval %s %s (in memory): %s\n' "$rep" "$interval" "$checkout" "$took"
                continue
            fi
            start=$(date +%s.%N)
            CKPTAVG_CACHE=$work/cache PYTHONPATH=$checkout python3 -m ckptavg trajectory "$data/pythia-1b" \
                --k 5 --nu 1000 --interval "$interval" --start 5000 --end 10000 --out "$work/out" -q >/dev/null
            end=$(date +%s.%N)
            printf 'rep %s interval %s %s: %.1f s\n' "$rep" "$interval" "$checkout" "$(echo "$end - $start" | bc)"
        done
    done
done
