#!/usr/bin/env bash
# The GPU checks, as one short run on a machine with a CUDA device (planned for about 6 minutes on a
# 16-core H200 machine; not yet run on one): the GPU tests, then bench/average.py's 12b case with the
# arithmetic on the GPU (3 repetitions, warm and cold) and, for the same-machine comparison, on its CPU
# (2 repetitions). It uses the machine's own Python packages (torch, safetensors, transformers, typer,
# rich, pytest), installs nothing and needs no network. Results go to OUTDIR (default $OUT, else
# /tmp/ckptavg-device): machine.txt, gpu-tests.txt, bench-cuda.txt, bench-cpu.txt.
#
#     bash bench/device.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/ckptavg-device}}
data=${CKPTAVG_BENCH_DATA:-/tmp/ckptavg-bench-data}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD DISABLE_SAFETENSORS_CONVERSION=1 HF_HUB_OFFLINE=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
    nproc
    free -g
    df -h "$(dirname "$data")"
} 2>&1 | tee "$out/machine.txt"

python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_average.py tests/test_hashing.py 2>&1 | tee "$out/gpu-tests.txt"

python3 bench/average.py --data "$data" --cases 12b --reps 3 --naive-reps 0 --device cuda 2>&1 \
    | tee "$out/bench-cuda.txt"
python3 bench/average.py --data "$data" --cases 12b --reps 2 --naive-reps 0 --device cpu 2>&1 \
    | tee "$out/bench-cpu.txt"
