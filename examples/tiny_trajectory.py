"""Train a tiny Pythia-architecture model on the Python standard library's source and save a trajectory.

A stand-in for EleutherAI's Pythia runs that needs no GPU and no network: byte-level tokens,
GPT-NeoX with parallel residual and 25% rotary dims, untied embeddings, AdamW with warmup then
cosine decay, a Hugging Face model folder `OUT/step{N}` every `--every` steps. Built once:
an existing finished trajectory is reused.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sysconfig
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.utils import logging as hf_logging


def corpus(split: str) -> bytes:
    """Standard-library modules, split into train and held-out by file (every 10th file held out)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chosen = [f for i, f in enumerate(files) if (i % 10 == 0) == (split == "heldout")]
    return b"\n".join(f.read_bytes() for f in chosen)


def config(ctx: int) -> GPTNeoXConfig:
    return GPTNeoXConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=ctx, rotary_pct=0.25,
                         use_parallel_residual=True, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0)


def batches(data: torch.Tensor, ctx: int, batch: int, rng: random.Random):
    while True:
        starts = [rng.randrange(len(data) - ctx - 1) for _ in range(batch)]
        yield torch.stack([data[s : s + ctx + 1] for s in starts]).long()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    if (args.out / f"step{args.steps}" / "config.json").is_file():
        print(f"{args.out}: trajectory present, reused")
        return
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = torch.frombuffer(bytearray(corpus("train")), dtype=torch.uint8)
    model = GPTNeoXForCausalLM(config(args.ctx))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = args.steps // 100 + 1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))) * 0.9 + 0.1)
    it = batches(data, args.ctx, args.batch, random.Random(args.seed))
    for step in range(1, args.steps + 1):
        x = next(it)
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.every == 0:
            model.save_pretrained(args.out / f"step{step}")
            print(f"step {step:5d}  train loss {loss.item():.3f}  saved {args.out / f'step{step}'}", flush=True)


if __name__ == "__main__":
    main()
