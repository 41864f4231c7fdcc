"""Held-out loss (bits per byte) of every checkpoint of a trajectory and of one averaged model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from tiny_trajectory import corpus  # noqa: E402


@torch.no_grad()
def bits_per_byte(folder: Path, data: torch.Tensor, ctx: int = 128) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    n = (len(data) - 1) // ctx
    x = data[: n * ctx + 1]
    inputs = x[:-1].view(n, ctx).long()
    total = 0.0
    for i in range(0, n, 64):
        total += model(input_ids=inputs[i : i + 64], labels=inputs[i : i + 64]).loss.item() * len(inputs[i : i + 64])
    return total / n / math.log(2)


def main() -> None:
    trajectory, averaged = Path(sys.argv[1]), Path(sys.argv[2])
    data = torch.frombuffer(bytearray(corpus("heldout")[:200_000]), dtype=torch.uint8)
    steps = sorted((p for p in trajectory.iterdir() if p.name.startswith("step")), key=lambda p: int(p.name[4:]))
    for p in steps[-5:]:
        print(f"original {p.name:>10}: {bits_per_byte(p, data):.4f} bits/byte (held-out)")
    print(f"averaged {averaged.name:>10}: {bits_per_byte(averaged, data):.4f} bits/byte (held-out, LAWA k=5)")


if __name__ == "__main__":
    main()
