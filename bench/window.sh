#!/usr/bin/env bash
# Sliding windows over a cold trajectory: `ckptavg trajectory` over bench/average.py's ten 1b
# checkpoints (build them with `python3 bench/average.py --cases 1b-k10 --reps 0`), k=5, nu=1000,
# outputs at steps 5000-10000 every INTERVAL steps (1000: six windows that share 4 of their 5 inputs
# with the next; 3000: two windows that share 2), hashed, the page cache dropped before each run (root
# only). The checkouts named are alternated in each repetition, so that two versions of the reader
# are timed under the same disk weather. Prints each run's wall time.
#
#     bash bench/window.sh [REPS] [CHECKOUT...]      (default: 2 repetitions of this checkout)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
reps=${1:-2}
shift || true
checkouts=("${@:-$root}")
data=$root/bench/data
work=$(mktemp -d "$data/window-XXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"  # not a checkout: its folder would shadow PYTHONPATH's ckptavg
for rep in $(seq "$reps"); do
    for interval in 1000 3000; do
        for checkout in "${checkouts[@]}"; do
            rm -rf "$work/out" "$work/cache"
            sync && echo 3 > /proc/sys/vm/drop_caches
            start=$(date +%s.%N)
            CKPTAVG_CACHE=$work/cache PYTHONPATH=$checkout python3 -m ckptavg trajectory "$data/pythia-1b" \
                --k 5 --nu 1000 --interval "$interval" --start 5000 --end 10000 --out "$work/out" -q >/dev/null
            end=$(date +%s.%N)
            printf 'rep %s interval %s %s: %.1f s\n' "$rep" "$interval" "$checkout" "$(echo "$end - $start" | bc)"
        done
    done
done
