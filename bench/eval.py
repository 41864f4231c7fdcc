"""Checkpoints scored per hour: a fresh model per checkpoint, one resident model, and in-memory averages.

Two cases, each a trajectory of N synthetic checkpoints built once under bench/data-eval/ with the
demo's tokenizer (trained on the standard library, as `examples/tiny_pythia/train.py` does):

  demo   the demo's model (GPT-NeoX, width 128, 2 layers, vocab 1024, float32)
  160m   Pythia-160M's shapes (width 768, 12 layers, vocab 50304, float16 as Pythia stores it)

Every mode scores the same perplexity task (held-out standard-library text, like the demo's) with
`ckptavg.api`, on the CPU, into a fresh results store, under the demo's pinned CPU settings
(`examples/tiny_pythia/reproducible.py`: AVX2 kernels, 2 threads), which this script takes on by
importing the demo's `train.py` for its tokenizer:

  fresh         `--fresh-model`: a model built for every checkpoint (ckptavg before the resident model)
  resident      one model, each checkpoint's weights copied into it
  in-memory     `trajectory --in-memory --eval`: each window's average made straight into the resident
                model (k inputs read per scored checkpoint), nothing written
  in-mem fresh  the same with `--fresh-model`: each average assembled in memory, a model built from it

Reported per repetition: seconds, checkpoints per hour, and ratios to `fresh` of the same repetition;
then min and median over repetitions. Timings are noisy on shared machines: never put them in a test.

    python bench/eval.py [--reps 3] [--cases demo,160m] [--checkpoints 6] [--k 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # width, layers, heads, vocab, context, stored dtype, held-out characters per file
    "demo": (128, 2, 4, 1024, 128, "float32", 1500),
    "160m": (768, 12, 12, 50304, 2048, "float16", 300),
}
TASK = "heldout"


def _train_module():
    """The demo's training script (its tokenizer and held-out text); importing it pins the CPU settings."""
    sys.path.insert(0, str(ROOT / "examples" / "tiny_pythia"))
    spec = importlib.util.spec_from_file_location("tiny_pythia_train", ROOT / "examples" / "tiny_pythia" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_case(train, data: Path, case: str, n: int) -> tuple[Path, Path]:
    """(trajectory folder, held-out jsonl), built once."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    width, layers, heads, vocab, ctx, dtype, chars = CASES[case]
    traj, heldout = data / case, data / f"{case}-heldout.jsonl"
    if all((traj / f"step{1000 * (i + 1)}" / "config.json").is_file() for i in range(n)) and heldout.is_file():
        return traj, heldout
    train.write_heldout(heldout, chars)
    tok = train.train_tokenizer(1024, train.source_files("train")[:40])
    eot = tok.convert_tokens_to_ids(train.EOT)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * width, max_position_embeddings=ctx, rotary_pct=0.25,
                           use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=eot, eos_token_id=eot)
    for i in range(n):
        folder = traj / f"step{1000 * (i + 1)}"
        print(f"building {folder} ...", flush=True)
        torch.manual_seed(i)
        GPTNeoXForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(folder)
        tok.save_pretrained(folder)
    return traj, heldout


def measure(mode: str, traj: Path, heldout: Path, k: int, work: Path) -> tuple[float, int]:
    """(seconds, checkpoints scored) of one mode, from a fresh results store."""
    from ckptavg import api
    from ckptavg.evaluation.targets import Target
    from ckptavg.report.store import ORIGINAL

    fresh = mode in ("fresh", "in-mem fresh")
    scoring = api.scoring(TASK, work / f"{mode}.sqlite", ppl_task=[f"{TASK}={heldout}"], device="cpu",
                          fresh_model=fresh, in_memory=mode.startswith("in-mem"), originals=False)
    began = time.perf_counter()
    if mode.startswith("in-mem"):
        steps = sorted(int(p.name[4:]) for p in traj.glob("step*"))
        spec = api.RunSpec("lawa", k, 1000, 1000, steps[k - 1], steps[-1])
        run = api.run_trajectory(api.open_trajectory(traj), spec, work / mode, api.Averaging(device="cpu"), scoring)
        scored = run.scored
    else:
        targets = [Target(traj.name, ORIGINAL, ORIGINAL, None, None, int(p.name[4:]), p)
                   for p in sorted(traj.glob("step*"), key=lambda p: int(p.name[4:]))]
        scored = api.evaluate(traj, scoring, targets=targets).scored
    return time.perf_counter() - began, scored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "data-eval")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default="demo,160m")
    ap.add_argument("--checkpoints", type=int, default=6, help="checkpoints in each trajectory")
    ap.add_argument("--k", type=int, default=3, help="inputs of each in-memory average")
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    args = ap.parse_args()
    train = _train_module()  # before torch is imported: the demo's CPU settings hold for every mode
    modes = ("fresh", "resident", "in-memory", "in-mem fresh")
    results: dict[str, list[float]] = {}
    for case in args.cases.split(","):
        traj, heldout = build_case(train, args.data, case, args.checkpoints)
        with tempfile.TemporaryDirectory(dir=args.data) as tmp:
            measure("resident", traj, heldout, args.k, Path(tmp) / "warm-up")  # imports, task registration, caches
        for rep in range(args.reps):
            per_hour: dict[str, float] = {}
            for mode in modes:
                with tempfile.TemporaryDirectory(dir=args.data) as tmp:
                    seconds, scored = measure(mode, traj, heldout, args.k, Path(tmp))
                per_hour[mode] = 3600 * scored / seconds
                results.setdefault(f"{case} {mode} checkpoints/h", []).append(per_hour[mode])
                results.setdefault(f"{case} {mode} s/checkpoint", []).append(seconds / scored)
                print(f"{case} rep {rep + 1} {mode:13} {seconds:7.2f} s for {scored} checkpoint(s): "
                      f"{per_hour[mode]:8.0f}/h", flush=True)
            for mode in modes[1:]:
                results.setdefault(f"{case} {mode} / fresh", []).append(per_hour[mode] / per_hour["fresh"])
    print(f"\n{'measure':40} {'min':>9} {'median':>9}  (n)")
    for key, values in results.items():
        print(f"{key:40} {min(values):9.2f} {statistics.median(values):9.2f}  ({len(values)})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
