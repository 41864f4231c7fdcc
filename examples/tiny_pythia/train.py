"""Train a small Pythia-architecture model on the Python standard library's source; save a trajectory.

A stand-in for EleutherAI's Pythia runs that needs no GPU and no network. The corpus is the
standard library's own `.py` files, split by file: every 10th file is held out. A byte-level
BPE tokenizer is trained on the training files with `tokenizers`. The model is GPT-NeoX with
Pythia's choices (parallel residual, rotary on 25% of each head, untied input and output
embeddings), trained with AdamW, linear warmup then cosine decay to 10% of the peak rate, as
Pythia was. Every `--every` steps it saves a Hugging Face model folder `OUT/step{N}/` (weights,
config, tokenizer): exactly the local trajectory layout ckptavg reads.

Seeds are fixed, and a finished trajectory is reused, so `make demo` trains only once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sysconfig
import time
from pathlib import Path

import reproducible  # beside this file

reproducible.pin()  # before torch is imported
import torch  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

EOT = "<|endoftext|>"


def source_files(split: str) -> list[Path]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f for i, f in enumerate(files) if (i % 10 == 0) == (split == "heldout")]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(vocab_size: int, files: list[Path]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((read(f) for f in files), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)


def write_heldout(path: Path, chars: int) -> None:
    """The held-out files as {"text"} records (the first `chars` characters of each), for `--ppl-task`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for file in source_files("heldout"):
            text = read(file)[:chars].strip()
            if text:
                f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)


def model_config(vocab: int, ctx: int, width: int, layers: int, eot: int) -> GPTNeoXConfig:
    return GPTNeoXConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=4 * width, max_position_embeddings=ctx, rotary_pct=0.25,
                         use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=eot, eos_token_id=eot)


def retire(out: Path, keep: int, to: Path | None) -> None:
    saved = sorted((p for p in out.glob("step*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    for old in saved[:-keep]:
        if to is None:
            shutil.rmtree(old)
        else:
            to.mkdir(parents=True, exist_ok=True)
            os.replace(old, to / old.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="trajectory folder: OUT/step{N}/")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=50, help="save a checkpoint every this many steps")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=Path, help="also write the held-out files here as jsonl")
    ap.add_argument("--heldout-chars", type=int, default=3000)
    ap.add_argument("--max-files", type=int, help="train on only the first N training files (for quick tests)")
    ap.add_argument("--keep-last", type=int, help="delete all but the newest N checkpoints after each save, as "
                    "trainers do (save_total_limit, max_checkpoints)")
    ap.add_argument("--retire-to", type=Path, help="with --keep-last: move old checkpoints here instead of "
                    "deleting them (gone from OUT all the same; kept for a test's reference averages)")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds to wait after each save: the training time "
                    "of a larger model, for a follower to keep up with")
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.heldout and not args.heldout.is_file():
        write_heldout(args.heldout, args.heldout_chars)
    if (args.out / f"step{args.steps}" / "config.json").is_file():
        print(f"{args.out}: trajectory present, reused")
        return
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    files = source_files("train")[: args.max_files]
    tok = train_tokenizer(args.vocab, files)
    eot = tok.convert_tokens_to_ids(EOT)
    ids = [i for f in files for i in tok(read(f))["input_ids"] + [eot]]
    data = torch.tensor(ids, dtype=torch.int32)
    model = GPTNeoXForCausalLM(model_config(len(tok), args.ctx, args.width, args.layers, eot))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 100)

    def rate(step: int) -> float:  # Pythia's shape: linear warmup, cosine decay to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    rng = random.Random(args.seed)
    start = time.time()
    print(f"{args.out.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(data) / 1e6:.2f}M training tokens, lr {args.lr:g}", flush=True)
    for step in range(1, args.steps + 1):
        starts = [rng.randrange(len(data) - args.ctx) for _ in range(args.batch)]
        x = torch.stack([data[s : s + args.ctx] for s in starts]).long()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.every == 0:
            folder = args.out / f"step{step}"
            tmp = args.out / f".step{step}.tmp"
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if folder.exists():  # left by an earlier, interrupted training run
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            if args.keep_last:
                retire(args.out, args.keep_last, args.retire_to)
            time.sleep(args.pause)
            if step % (args.every * 10) == 0 or step == args.steps:
                print(f"  step {step:5d}  train loss {loss.item():.3f}  ({time.time() - start:.0f} s)", flush=True)
    record = {"lr": args.lr, "steps": args.steps, "seconds": round(time.time() - start, 1),
              "cpu_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              **{k: os.environ.get(k) for k in reproducible.SETTINGS}}
    (args.out / "training.json").write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
