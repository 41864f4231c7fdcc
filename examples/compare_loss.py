"""Held-out loss (bits per byte) of the original and the averaged checkpoint at every averaged step."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).parent))
from tiny_trajectory import corpus  # noqa: E402


@torch.no_grad()
def bits_per_byte(folder: Path, data: torch.Tensor, ctx: int = 128) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    n = (len(data) - 1) // ctx
    inputs = data[: n * ctx].view(n, ctx).long()
    total = 0.0
    for i in range(0, n, 64):
        batch = inputs[i : i + 64]
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    return total / n / math.log(2)


def main() -> None:
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    trajectory, averaged = Path(sys.argv[1]), Path(sys.argv[2])
    data = torch.frombuffer(bytearray(corpus("heldout")[:200_000]), dtype=torch.uint8)
    outputs = sorted((p for p in averaged.iterdir() if p.name.startswith("step")), key=lambda p: int(p.name[4:]))
    print(f"{'step':>6} {'original':>9} {'averaged':>9}  held-out bits/byte ({averaged.name})")
    for out in outputs:
        orig, avg = bits_per_byte(trajectory / out.name, data), bits_per_byte(out, data)
        print(f"{out.name[4:]:>6} {orig:9.4f} {avg:9.4f}  {'averaged better' if avg < orig else ''}")


if __name__ == "__main__":
    main()
