"""What the exact default costs on float32 checkpoints: summed in float64 (auto) against float32.

Trainers save float32, and a float32 sum of float32 inputs is not exact, so ckptavg sums them in
float64 by default. This times `ckptavg average --no-hash` of k float32 checkpoints, warm, with
`--accumulate auto` (float64) and `--accumulate float32`, alternated in fresh processes, beside the
same run's read floor (`cat` of the inputs), and prints min and median of each.

    python bench/accumulate.py [--gb-per-input 1.0] [--k 5] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(folder: Path, k: int, gb: float) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    numel = 16 * 1024 * 1024  # 64 MiB float32 tensors
    n = max(1, round(gb * 1e9 / (numel * 4)))
    inputs = []
    for i in range(k):
        step = folder / f"step{i + 1}"
        if not (step / "model.safetensors").is_file():
            step.mkdir(parents=True, exist_ok=True)
            g = torch.Generator().manual_seed(i)
            save_file({f"layers.{j}.weight": torch.randn(numel, generator=g) for j in range(n)},
                      str(step / "model.safetensors"))
        inputs.append(step)
    return inputs


def timed(cmd: list[str]) -> float:
    """Run outside the checkout (its folder would shadow PYTHONPATH), with this checkout's ckptavg."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "data" / "float32")
    ap.add_argument("--gb-per-input", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    inputs = build(args.data, args.k, args.gb_per_input)
    files = [str(f / "model.safetensors") for f in inputs]
    out = args.data / "out"
    times: dict[str, list[float]] = {"read floor (cat)": [], "auto (float64)": [], "float32": []}
    for _ in range(args.reps):
        times["read floor (cat)"].append(timed(["sh", "-c", f"cat {' '.join(files)} > /dev/null"]))
        for name, acc in (("auto (float64)", "auto"), ("float32", "float32")):
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(timed([sys.executable, "-m", "ckptavg", "average", *map(str, inputs), "--out", str(out),
                                      "--accumulate", acc, "--no-hash", "--device", "cpu", "-q"]))
    shutil.rmtree(out, ignore_errors=True)
    size = sum(Path(f).stat().st_size for f in files) / 1e9
    print(f"{args.k} x {size / args.k:.2f} GB float32 inputs, warm, {args.reps} reps alternated")
    print(f"{'':24}{'min':>8}{'median':>8}")
    for name, ts in times.items():
        print(f"{name:24}{min(ts):8.2f}{statistics.median(ts):8.2f}")


if __name__ == "__main__":
    main()
